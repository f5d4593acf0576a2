//! The access log: one line per request, written when the response body is done
//! (README "Access log").

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::health::HealthBoard;
use crate::metrics::{Ended, Metrics};
use crate::route::Reason;
use crate::table::Upstream;

/// What one request did; logged once, when dropped.
#[derive(Debug)]
pub struct AccessRecord {
    /// When the request arrived.
    pub start: Instant,
    /// The user, if a trusted peer named one.
    pub user: Option<Box<str>>,
    /// The client address after `X-Forwarded-For` handling.
    pub client: IpAddr,
    /// Request method.
    pub method: http::Method,
    /// Request path (without query, which may hold presigned credentials).
    pub path: Box<str>,
    /// Status sent to the client; 0 while none has been decided.
    pub status: u16,
    /// Upstream that answered, if any.
    pub upstream: Option<Upstream>,
    /// Why the request went there (`None` for requests refused before routing).
    pub reason: Option<Reason>,
    /// Response body bytes sent.
    pub bytes: u64,
    /// The body reached its end (false: the client went away or the upstream broke).
    pub complete: bool,
    /// The upstream body failed mid-stream.
    pub upstream_error: bool,
    /// The upstream body stopped moving for the idle time (and the connection was closed).
    pub upstream_stalled: bool,
    /// The client went away before the response was decided (its upload broke off).
    pub client_closed: bool,
    /// Where the request is counted, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// Set when the response is an upstream's answer: told how its body ended.
    pub health: Option<Arc<HealthBoard>>,
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        // Dropped before a status was decided: the connection went away under the request.
        let left_early = self.client_closed || self.status == 0;
        // A body that stopped short without an upstream error stopped at the client.
        let client_closed = left_early || (!self.complete && !self.upstream_error);
        if left_early {
            // nginx's "client closed request".
            self.status = 499;
        }
        let ended = if self.upstream_error {
            Ended::UpstreamBroke
        } else if client_closed {
            Ended::ClientClosed
        } else {
            Ended::Answered(self.status)
        };
        // Set when an upstream's answer was passed on: its end tells that upstream's health.
        if let (Some(h), Some(u)) = (&self.health, self.upstream) {
            if self.upstream_error {
                // After the head, nothing can be retried; the client saw the download break.
                let what =
                    if self.upstream_stalled { "upstream stalled mid-body" } else { "upstream broke off the body" };
                // Not an access line (README "Access log"): its own target.
                tracing::warn!(target: "mediaroute::upstream", upstream = u.as_str(), path = &*self.path, bytes = self.bytes, "{what}");
                h.of(u).failure(if self.upstream_stalled {
                    "response body stalled"
                } else {
                    "response body broke off"
                });
            } else if self.complete && self.status < 500 {
                // Delivered whole. A client that left says nothing either way.
                h.of(u).success();
            }
        }
        if let Some(m) = &self.metrics {
            m.request(self.upstream, self.reason, ended, self.bytes, took);
        }
        let duration_ms = took.as_secs_f64() * 1000.0;
        tracing::info!(
            target: crate::log_writer::ACCESS_TARGET,
            user = self.user.as_deref().unwrap_or("-"),
            client = %self.client,
            method = %self.method,
            path = &*self.path,
            status = self.status,
            upstream = self.upstream.map_or("-", Upstream::as_str),
            reason = self.reason.map_or("-", Reason::as_str),
            bytes = self.bytes,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            complete = self.complete,
            upstream_error = self.upstream_error,
        );
    }
}
