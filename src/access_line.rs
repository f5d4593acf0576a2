//! The access line's formatter (README "Access log"): a `tracing` layer for the events of
//! target `mediaroute::access` that writes each line straight into the log's buffer, in
//! the same text or JSON form as `tracing_subscriber::fmt` (a test holds the two equal),
//! at a fraction of its cost: no per-field `fmt` machinery, and the date worked out once
//! a second.

use std::cell::RefCell;
use std::fmt::Debug;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::log_writer::LogWriter;

/// Formats access events into the log's buffer; install it for target
/// [`crate::log_writer::ACCESS_TARGET`] only.
#[derive(Debug)]
pub struct AccessLayer {
    writer: LogWriter,
    json: bool,
}

impl AccessLayer {
    /// A layer writing to `writer`, as JSON objects or as text.
    pub fn new(writer: LogWriter, json: bool) -> AccessLayer {
        AccessLayer { writer, json }
    }
}

thread_local! {
    /// The line being formatted: one buffer per thread, reused.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<S: Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        LINE.with_borrow_mut(|line| {
            line.clear();
            format_line(event, self.json, SystemTime::now(), line);
            self.writer.push_access_line(line);
        });
    }
}

/// Writes `event` as one line, as `tracing_subscriber::fmt` would: text
/// (`{time} {level:>5} {target}: name=value ...`) or flattened JSON
/// (`{"timestamp":..,"level":..,fields..,"target":..}`).
pub fn format_line(event: &Event<'_>, json: bool, now: SystemTime, out: &mut Vec<u8>) {
    let meta = event.metadata();
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(now, out);
        out.extend_from_slice(b"\",\"level\":\"");
        out.extend_from_slice(meta.level().as_str().as_bytes());
        out.push(b'"');
        event.record(&mut JsonFields { out });
        out.extend_from_slice(b",\"target\":");
        json_str(meta.target(), out);
        out.extend_from_slice(b"}\n");
    } else {
        timestamp(now, out);
        let level = meta.level().as_str();
        out.extend(std::iter::repeat_n(b' ', 6 - level.len()));
        out.extend_from_slice(level.as_bytes());
        out.push(b' ');
        out.extend_from_slice(meta.target().as_bytes());
        out.push(b':');
        event.record(&mut TextFields { out });
        out.push(b'\n');
    }
}

/// `name=value` pairs, values as `Debug` shows them (strings quoted and escaped).
struct TextFields<'a> {
    out: &'a mut Vec<u8>,
}

impl TextFields<'_> {
    fn name(&mut self, field: &Field) {
        self.out.push(b' ');
        if field.name() != "message" {
            self.out.extend_from_slice(field.name().as_bytes());
            self.out.push(b'=');
        }
    }
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        if field.name() == "message" {
            self.out.extend_from_slice(value.as_bytes());
        } else if plain(value) {
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            debug(&value, self.out);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        int(value, self.out);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        int(value, self.out);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        boolean(value, self.out);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.name(field);
        debug(value, self.out);
    }
}

/// `,"name":value` pairs, as `tracing_serde` writes them: numbers and booleans bare, the
/// rest as JSON strings (`Debug` output for values that are not strings).
struct JsonFields<'a> {
    out: &'a mut Vec<u8>,
}

impl JsonFields<'_> {
    fn name(&mut self, field: &Field) {
        self.out.push(b',');
        json_str(field.name(), self.out);
        self.out.push(b':');
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        json_str(value, self.out);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        int(value, self.out);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        int(value, self.out);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        boolean(value, self.out);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        // serde_json's own number form (null for NaN and infinities).
        let _ = serde_json::to_writer(&mut *self.out, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.name(field);
        let start = self.out.len();
        debug(value, self.out);
        let shown = self.out.split_off(start);
        match std::str::from_utf8(&shown) {
            Ok(s) => json_str(s, self.out),
            Err(_) => json_str(&String::from_utf8_lossy(&shown), self.out),
        }
    }
}

/// An integer as both `Debug` and JSON show it.
fn int(value: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// A boolean as both `Debug` and JSON show it.
fn boolean(value: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

/// Printable ASCII other than `"` and `\`: shown as is by both `Debug` and JSON.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `value` as `{:?}` shows it.
fn debug(value: &dyn Debug, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{value:?}");
}

/// `s` as a JSON string.
fn json_str(s: &str, out: &mut Vec<u8>) {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json's escaping, as tracing's JSON format uses.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

thread_local! {
    /// The last second formatted (`YYYY-MM-DDTHH:MM:SS.`) and its Unix time.
    static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

/// `now` in RFC 3339 UTC with microseconds, as `tracing_subscriber::fmt` writes it
/// (`2026-11-24T04:47:22.136084Z`).
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    // Before 1970 only on a badly wrong clock: shown as the epoch.
    let since = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *text = second(secs);
            *cached = secs;
        }
        out.extend_from_slice(text);
    });
    let mut number = itoa::Buffer::new();
    let micros = number.format(since.subsec_micros()).as_bytes();
    let mut digits = [b'0'; 6];
    digits[6 - micros.len()..].copy_from_slice(micros);
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` for a Unix time (the civil-from-days algorithm of
/// H. Hinnant's "chrono-Compatible Low-Level Date Algorithms").
fn second(secs: u64) -> [u8; 20] {
    let days = secs / 86_400;
    let in_day = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, in_day / 3600);
    put(14, 2, in_day / 60 % 60);
    put(17, 2, in_day % 60);
    text
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::access::AccessRecord;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut out = Vec::new();
            timestamp(SystemTime::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_494_442, 136_084), "2026-11-24T04:27:22.136084Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
        // The cached second is not reused for the next one.
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
    }

    /// A layer that formats with [`format_line`] into `out`.
    struct Capture {
        out: Arc<Mutex<Vec<u8>>>,
        json: bool,
    }

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            format_line(event, self.json, SystemTime::now(), &mut self.out.lock().unwrap());
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(user: Option<&str>, path: &str) -> AccessRecord {
        AccessRecord {
            start: Instant::now(),
            user: user.map(Box::from),
            client: "2001:db8::7".parse().unwrap(),
            method: http::Method::GET,
            path: Box::from(path),
            status: 206,
            upstream: Some(crate::table::Upstream::Replica),
            reason: Some(crate::route::Reason::Replica),
            bytes: 1 << 40,
            complete: true,
            upstream_error: false,
            upstream_stalled: false,
            client_closed: false,
            metrics: None,
            health: None,
        }
    }

    /// Every line with its timestamp (the first 27 characters of a text line, the value
    /// of `timestamp` in JSON) blanked.
    fn lines(bytes: &[u8], json: bool) -> Vec<String> {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        text.lines().map(|l| if json { format!("{}{}", &l[..14], &l[41..]) } else { l[27..].to_string() }).collect()
    }

    #[test]
    fn access_lines_are_those_of_tracing_subscriber_fmt() {
        let odd = [
            (Some("alice"), "/media/shot 01.mov"),
            (None, "/m/quote\"back\\slash"),
            (Some("zoë"), "/m/ünïcode/日本"),
            (Some("tab\tuser"), "/m/new\nline\r\u{7f}\u{1b}[31m"),
            (Some(""), "/"),
        ];
        for json in [false, true] {
            let ours = Arc::new(Mutex::new(Vec::new()));
            let theirs = Shared::default();
            let writer = theirs.clone();
            let fmt = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(move || writer.clone());
            let fmt = if json { fmt.json().flatten_event(true).boxed() } else { fmt.boxed() };
            let subscriber = tracing_subscriber::registry().with(fmt).with(Capture { out: Arc::clone(&ours), json });
            tracing::subscriber::with_default(subscriber, || {
                for (user, path) in odd {
                    drop(record(user, path));
                }
                let mut r = record(Some("bob"), "/k");
                r.status = 0;
                r.complete = false;
                r.upstream = None;
                r.reason = None;
                drop(r);
            });
            let ours = lines(&ours.lock().unwrap(), json);
            let theirs = lines(&theirs.0.lock().unwrap(), json);
            assert_eq!(ours.len(), odd.len() + 1);
            assert_eq!(ours, theirs, "json: {json}");
            if json {
                for l in &ours {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert_eq!(v["target"], "mediaroute::access", "{l}");
                }
            }
        }
    }
}
