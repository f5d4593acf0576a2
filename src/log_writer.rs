//! The log's buffered writer (README "Access log"): every formatted line is appended to a
//! bounded buffer in memory, and a thread of its own writes the buffer out in large
//! writes, at least once a second. A request never waits on the log's sink: when the
//! buffer is full, the line is dropped and counted.

use std::io::Write;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// The target of access lines (see [`crate::access`]).
pub const ACCESS_TARGET: &str = "mediaroute::access";

/// The target of the writer's own report of dropped lines: it is never dropped itself
/// (one line a second at most, so the buffer cannot grow without bound).
const REPORT_TARGET: &str = "mediaroute::log_writer";

/// Lines are gathered in blocks of this size; the writer wakes once one is full, ahead of
/// its interval (nginx's `access_log ... buffer=64k`). Blocks are never grown and copied.
const BLOCK: usize = 64 * 1024;

/// Written blocks kept for reuse: a steady load allocates none.
const SPARE_BLOCKS: usize = 4;

/// Access lines dropped because the buffer was full, process-wide
/// (`mediaroute_access_log_dropped_total`).
pub static ACCESS_LINES_DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// How the writer runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The most bytes waiting to be written; lines that do not fit are dropped.
    pub capacity: usize,
    /// The longest a line waits before it is written.
    pub interval: Duration,
}

/// Hands out the writers the `tracing` formatter writes each line into; install it with
/// `tracing_subscriber::fmt().with_writer(..)`.
#[derive(Debug, Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after writing every line logged until then.
#[derive(Debug)]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    settings: Settings,
}

#[derive(Debug, Default)]
struct State {
    /// Full blocks of whole lines, waiting to be written, oldest first.
    full: Vec<Vec<u8>>,
    /// The block lines are appended to.
    current: Vec<u8>,
    /// Bytes in `full` and `current`.
    pending: usize,
    /// Written blocks, emptied, for reuse.
    spare: Vec<Vec<u8>>,
    /// The writer was told to write before its interval ends.
    woken: bool,
    /// Lines dropped since the last report.
    dropped_access: u64,
    dropped_other: u64,
    stopping: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing is left half-done under this lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one line, or drops it when the buffer is full. Access lines wait for a full
    /// block or the interval; any other line (start-up, reloads, warnings: few, and wanted
    /// at once) wakes the writer.
    fn push(&self, line: &[u8], access: bool, report: bool) {
        let mut state = self.lock();
        // A line longer than the whole buffer still goes into an empty one.
        if state.pending > 0 && state.pending + line.len() > self.settings.capacity && !report {
            if access {
                state.dropped_access += 1;
                ACCESS_LINES_DROPPED.inc();
            } else {
                state.dropped_other += 1;
            }
            return;
        }
        if state.current.len() + line.len() > BLOCK && !state.current.is_empty() {
            let next = state.spare.pop().unwrap_or_else(|| Vec::with_capacity(BLOCK));
            let done = std::mem::replace(&mut state.current, next);
            state.full.push(done);
        } else if state.current.capacity() == 0 {
            state.current = state.spare.pop().unwrap_or_else(|| Vec::with_capacity(BLOCK));
        }
        state.current.extend_from_slice(line);
        state.pending += line.len();
        // One wake-up per block (or half the buffer, when that is smaller), not per line:
        // the writer takes everything at once.
        let due = !state.full.is_empty() || state.pending >= self.settings.capacity / 2;
        if !state.woken && (!access || due) {
            state.woken = true;
            drop(state);
            self.wake.notify_one();
        }
    }
}

impl LogWriter {
    /// Appends one whole access line (ending in a newline), formatted elsewhere.
    pub fn push_access_line(&self, line: &[u8]) {
        self.shared.push(line, true, false);
    }
}

/// Starts the writer thread for `sink`.
pub fn start(sink: Box<dyn Write + Send>, settings: Settings) -> std::io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new(), settings });
    let for_thread = Arc::clone(&shared);
    let thread = std::thread::Builder::new().name("log-writer".into()).spawn(move || write_out(&for_thread, sink))?;
    Ok((LogWriter { shared: Arc::clone(&shared) }, LogGuard { shared, thread: Some(thread) }))
}

/// The writer thread: takes the waiting lines every interval (or sooner when woken) and
/// writes them with as few system calls as the sink allows.
fn write_out(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let interval = shared.settings.interval;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut last_report = Instant::now();
    let (mut dropped_access, mut dropped_other) = (0u64, 0u64);
    loop {
        let stopping = {
            let mut state = shared.lock();
            let until = Instant::now() + interval;
            while !state.woken && !state.stopping {
                let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                    break;
                };
                state = shared.wake.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
            }
            state.woken = false;
            std::mem::swap(&mut state.full, &mut batch);
            if !state.current.is_empty() {
                let last = std::mem::take(&mut state.current);
                batch.push(last);
            }
            state.pending = 0;
            dropped_access += std::mem::take(&mut state.dropped_access);
            dropped_other += std::mem::take(&mut state.dropped_other);
            state.stopping
        };
        if !batch.is_empty() {
            for block in &batch {
                write_block(&mut *sink, block);
            }
            let _ = sink.flush();
            let mut state = shared.lock();
            for mut block in batch.drain(..) {
                // A block that one long line made larger is not kept.
                if state.spare.len() < SPARE_BLOCKS && block.capacity() <= BLOCK {
                    block.clear();
                    state.spare.push(block);
                }
            }
        }
        // Said at most once per interval (and at exit), into the buffer just emptied.
        if (dropped_access > 0 || dropped_other > 0) && (last_report.elapsed() >= interval || stopping) {
            tracing::warn!(
                target: REPORT_TARGET,
                access_lines = dropped_access,
                other_lines = dropped_other,
                capacity = shared.settings.capacity,
                "the log's sink is too slow: lines were dropped (mediaroute_access_log_dropped_total)"
            );
            (dropped_access, dropped_other) = (0, 0);
            last_report = Instant::now();
        }
        // At exit, lines logged or dropped while this batch was written (the report too)
        // take one more round.
        if stopping {
            let state = shared.lock();
            if state.pending == 0 && state.dropped_access == 0 && state.dropped_other == 0 {
                return;
            }
        }
    }
}

/// Writes one block to the sink. A sink that would block (a non-blocking stderr that is
/// full) is waited for as a blocking one would be: lines meanwhile wait in the buffer, or
/// are dropped and counted. A sink that fails (stderr closed) loses the block: there is
/// nowhere left to say so.
fn write_block(sink: &mut dyn Write, mut block: &[u8]) {
    while !block.is_empty() {
        match sink.write(block) {
            Ok(0) => return,
            Ok(n) => block = &block[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return,
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One formatted line on its way into the buffer. The formatter writes each line with
/// one `write_all`, which is one `write` here: lines never interleave.
#[derive(Debug)]
pub struct Line<'a> {
    shared: &'a Shared,
    access: bool,
    report: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.shared.push(bytes, self.access, self.report);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line { shared: &self.shared, access: false, report: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        let target = meta.target();
        Line { shared: &self.shared, access: target == ACCESS_TARGET, report: target == REPORT_TARGET }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose writes are seen by the test, and which can be held up.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<std::sync::atomic::AtomicUsize>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _held = self.gate.lock().unwrap();
            self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &LogWriter, text: &str) {
        w.push_access_line(text.as_bytes());
    }

    #[test]
    fn lines_are_written_together_and_all_of_them_at_stop() {
        let sink = Sink::default();
        let settings = Settings { capacity: 1 << 20, interval: Duration::from_secs(3600) };
        let (w, guard) = start(Box::new(sink.clone()), settings).unwrap();
        for i in 0..1000 {
            line(&w, &format!("line {i}\n"));
        }
        drop(guard);
        let text = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
        // 1000 short lines are under the write threshold: one write at stop.
        assert_eq!(sink.writes.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_full_buffer_drops_lines_instead_of_waiting() {
        let sink = Sink::default();
        let held = sink.gate.lock().unwrap();
        let settings = Settings { capacity: 100, interval: Duration::from_millis(10) };
        let (w, guard) = start(Box::new(sink.clone()), settings).unwrap();
        let dropped_before = ACCESS_LINES_DROPPED.get();
        // The writer takes the first batch and blocks in the sink; the buffer then fills.
        line(&w, &"a".repeat(59));
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..10 {
            line(&w, &"b".repeat(49));
        }
        assert!(ACCESS_LINES_DROPPED.get() - dropped_before >= 8, "two 50-byte lines fit in 100 bytes");
        drop(held);
        drop(guard);
        let text = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with(&"a".repeat(59)), "{text}");
        assert_eq!(text.matches(&"b".repeat(49)).count(), 2, "{text}");
    }
}
