//! The access log: one line per request, formatted on the request's thread into that
//! thread's buffer and written by a thread of its own, so a request never waits on a disk
//! or a pipe. A `tracing` event per request cost a third of the proxy's throughput (an
//! allocation and a `write` per line); here a line is a few hundred instructions and no
//! allocation.
//!
//! Each thread that logs has its own buffer; the writer swaps each buffer out every
//! flush interval, or sooner when one passes a high-water mark. A buffer never grows past
//! its cap: when the target is slower than the traffic, lines are dropped and counted
//! (`switchyard_access_log_dropped_total`), never waited for. The per-thread lock is held
//! by its owner for one append and by the writer for one swap, so it is never contended
//! for longer than that.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `time  INFO access: key=value ...`, strings quoted and escaped.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where lines go and how much may wait for the writer.
#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    pub format: LineFormat,
    /// A file opened for appending (and reopened when it is renamed or removed, as log
    /// rotation does); `None`: standard error.
    pub path: Option<PathBuf>,
    /// Bytes a thread's buffer may hold before lines are dropped.
    pub buffer_bytes: usize,
    /// The longest a line waits in its buffer.
    pub flush_interval: Duration,
}

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("access log file {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("starting the access-log writer thread: {0}")]
    Thread(io::Error),
}

/// One request, as logged.
pub struct AccessLine<'a> {
    pub request_id: &'a [u8],
    /// The W3C trace id, written as 32 hex digits.
    pub trace_id: [u8; 16],
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub service: &'a str,
    pub upstream: &'a str,
    pub tries: u32,
    pub bytes: u64,
    pub complete: bool,
    pub duration: Duration,
    pub client_ip: IpAddr,
    pub consumer: &'a str,
}

/// A thread's buffer: its lines, and whether the writer was told it is filling up.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    signalled: bool,
}

struct Slot {
    pending: Mutex<Pending>,
}

struct Shared {
    id: u64,
    settings: AccessLogSettings,
    slots: Mutex<Vec<Arc<Slot>>>,
    dropped: AtomicU64,
    closing: AtomicBool,
    writer: OnceLock<Thread>,
}

/// The access log's handle; cheap to share. Dropping the last handle writes what is
/// buffered and stops the writer.
pub struct AccessLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's buffer in each access log it wrote to (one, but in tests).
    static SLOTS: RefCell<Vec<(u64, Arc<Slot>)>> = const { RefCell::new(Vec::new()) };
    /// The second this thread last formatted, and its text (`2026-12-05T19:40:01`).
    static CLOCK: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn start(settings: AccessLogSettings) -> Result<AccessLog, AccessLogError> {
        let target = Target::open(settings.path.clone())?;
        let shared = Arc::new(Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            settings,
            slots: Mutex::default(),
            dropped: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            writer: OnceLock::new(),
        });
        let for_writer = shared.clone();
        let handle = thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&for_writer, target))
            .map_err(AccessLogError::Thread)?;
        let _ = shared.writer.set(handle.thread().clone());
        Ok(AccessLog {
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Formats `line` into this thread's buffer; drops (and counts) it when the buffer
    /// is full.
    pub fn write(&self, line: &AccessLine<'_>) {
        let shared = &self.shared;
        let slot = SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            if let Some((_, slot)) = slots.iter().find(|(id, _)| *id == shared.id) {
                return slot.clone();
            }
            let slot = Arc::new(Slot {
                pending: Mutex::default(),
            });
            shared
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(slot.clone());
            slots.push((shared.id, slot.clone()));
            slot
        });
        let mut pending = slot.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let cap = shared.settings.buffer_bytes;
        if pending.lines.len() >= cap {
            drop(pending);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::ACCESS_LOG_DROPPED).increment(1);
            return;
        }
        if pending.lines.capacity() == 0 {
            pending.lines.reserve(cap.min(64 * 1024));
        }
        let now = SystemTime::now();
        match shared.settings.format {
            LineFormat::Text => format_text(&mut pending.lines, now, line),
            LineFormat::Json => format_json(&mut pending.lines, now, line),
        }
        // Past a quarter of the cap the writer is woken rather than waited for.
        if !pending.signalled && pending.lines.len() >= cap / 4 {
            pending.signalled = true;
            drop(pending);
            if let Some(writer) = shared.writer.get() {
                writer.unpark();
            }
        }
    }

    /// Lines dropped so far because a buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        if let Some(handle) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// Takes every thread's lines into `out` (emptied buffers go back to their threads), and
/// forgets the buffers of threads that ended.
fn collect(shared: &Shared, out: &mut Vec<u8>) {
    let mut slots = shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
    for slot in slots.iter() {
        let mut pending = slot.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.lines.is_empty() {
            continue;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut pending.lines);
        } else {
            out.extend_from_slice(&pending.lines);
            pending.lines.clear();
        }
        pending.signalled = false;
    }
    // Only this list holds the buffer of a thread that has ended (it was just emptied).
    slots.retain(|slot| Arc::strong_count(slot) > 1);
}

fn write_loop(shared: &Shared, mut target: Target) {
    let interval = shared.settings.flush_interval;
    let mut batch: Vec<u8> = Vec::new();
    let mut checked = Instant::now();
    loop {
        let closing = shared.closing.load(Ordering::Acquire);
        collect(shared, &mut batch);
        if !batch.is_empty() {
            if let Err(e) = target.write(&batch) {
                tracing::warn!(target = %target.describe(), error = %e, "access log write failed; lines lost");
            }
            batch.clear();
        }
        if closing {
            return;
        }
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            target.reopen_if_rotated();
        }
        thread::park_timeout(interval);
    }
}

/// Standard error, or a file that follows log rotation.
enum Target {
    Stderr,
    File {
        path: PathBuf,
        file: File,
        inode: u64,
    },
}

impl Target {
    fn open(path: Option<PathBuf>) -> Result<Target, AccessLogError> {
        let Some(path) = path else {
            return Ok(Target::Stderr);
        };
        let (file, inode) = open_append(&path).map_err(|source| AccessLogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Target::File { path, file, inode })
    }

    fn describe(&self) -> String {
        match self {
            Target::Stderr => "stderr".into(),
            Target::File { path, .. } => path.display().to_string(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Target::Stderr => io::stderr().lock().write_all(bytes),
            Target::File { file, .. } => file.write_all(bytes),
        }
    }

    /// After `mv access.log access.log.1` (or its removal) the next lines go to a new
    /// `access.log`, as nginx does on a signal; here nobody needs to send one.
    fn reopen_if_rotated(&mut self) {
        let Target::File { path, file, inode } = self else {
            return;
        };
        let current = std::fs::metadata(&*path).map(|m| m.ino()).ok();
        if current == Some(*inode) {
            return;
        }
        match open_append(path) {
            Ok((new, ino)) => {
                *file = new;
                *inode = ino;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "access log could not be reopened after rotation; writing to the old file")
            }
        }
    }
}

fn open_append(path: &std::path::Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let inode = file.metadata()?.ino();
    Ok((file, inode))
}

/// `2026-12-05T19:40:01.123Z`, the second's text formatted once per second per thread.
fn push_time(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    CLOCK.with(|clock| {
        let mut clock = clock.borrow_mut();
        if clock.0 != secs {
            *clock = (secs, second_text(secs));
        }
        out.extend_from_slice(&clock.1);
    });
    let millis = since.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC).
fn second_text(secs: u64) -> [u8; 19] {
    let (year, month, day) = civil_date((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut text = [0u8; 19];
    let _ = write!(
        &mut text[..],
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    text
}

/// Days since 1970-01-01 as (year, month, day) in the proleptic Gregorian calendar.
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Milliseconds with three decimals.
fn push_millis(out: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros();
    push_int(out, (micros / 1000) as u64);
    let frac = (micros % 1000) as u16;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_int(out, octet);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A string in double quotes, escaped as JSON escapes it (which a text reader also
/// reads back): a client's path or a token's subject can never end a line or a field.
fn push_quoted(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    // Eight bytes at a time while none needs escaping (nearly always: ids, paths, names).
    let mut clean = 0;
    for chunk in s.chunks_exact(8) {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(chunk);
        if needs_escape(u64::from_le_bytes(eight)) {
            break;
        }
        clean += 8;
    }
    out.extend_from_slice(&s[..clean]);
    push_escaped(out, &s[clean..]);
    out.push(b'"');
}

/// Whether any of eight bytes is a control character, `"` or `\` (bytes of UTF-8
/// sequences, 0x80 and above, are not).
fn needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGHS != 0;
    below_space
        || zero_in(x ^ (ONES * u64::from(b'"')))
        || zero_in(x ^ (ONES * u64::from(b'\\')))
        || zero_in(x ^ (ONES * 0x7f))
}

/// The rest of a quoted string, a byte at a time.
fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
}

fn format_text(out: &mut Vec<u8>, now: SystemTime, l: &AccessLine<'_>) {
    push_time(out, now);
    out.extend_from_slice(b"  INFO access: request_id=");
    push_quoted(out, l.request_id);
    out.extend_from_slice(b" trace_id=");
    crate::hex::push(out, &l.trace_id);
    out.extend_from_slice(b" method=");
    push_quoted(out, l.method.as_bytes());
    out.extend_from_slice(b" path=");
    push_quoted(out, l.path.as_bytes());
    out.extend_from_slice(b" status=");
    push_int(out, l.status);
    out.extend_from_slice(b" route=");
    push_quoted(out, l.route.as_bytes());
    out.extend_from_slice(b" service=");
    push_quoted(out, l.service.as_bytes());
    out.extend_from_slice(b" upstream=");
    push_quoted(out, l.upstream.as_bytes());
    out.extend_from_slice(b" tries=");
    push_int(out, l.tries);
    out.extend_from_slice(b" bytes=");
    push_int(out, l.bytes);
    out.extend_from_slice(if l.complete {
        b" complete=true duration_ms="
    } else {
        b" complete=false duration_ms="
    });
    push_millis(out, l.duration);
    out.extend_from_slice(b" client_ip=");
    push_ip(out, l.client_ip);
    out.extend_from_slice(b" consumer=");
    push_quoted(out, l.consumer.as_bytes());
    out.push(b'\n');
}

fn format_json(out: &mut Vec<u8>, now: SystemTime, l: &AccessLine<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    push_time(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"access\",\"request_id\":");
    push_quoted(out, l.request_id);
    out.extend_from_slice(b",\"trace_id\":\"");
    crate::hex::push(out, &l.trace_id);
    out.extend_from_slice(b"\",\"method\":");
    push_quoted(out, l.method.as_bytes());
    out.extend_from_slice(b",\"path\":");
    push_quoted(out, l.path.as_bytes());
    out.extend_from_slice(b",\"status\":");
    push_int(out, l.status);
    out.extend_from_slice(b",\"route\":");
    push_quoted(out, l.route.as_bytes());
    out.extend_from_slice(b",\"service\":");
    push_quoted(out, l.service.as_bytes());
    out.extend_from_slice(b",\"upstream\":");
    push_quoted(out, l.upstream.as_bytes());
    out.extend_from_slice(b",\"tries\":");
    push_int(out, l.tries);
    out.extend_from_slice(b",\"bytes\":");
    push_int(out, l.bytes);
    out.extend_from_slice(if l.complete {
        b",\"complete\":true,\"duration_ms\":"
    } else {
        b",\"complete\":false,\"duration_ms\":"
    });
    push_millis(out, l.duration);
    out.extend_from_slice(b",\"client_ip\":\"");
    push_ip(out, l.client_ip);
    out.extend_from_slice(b"\",\"consumer\":");
    push_quoted(out, l.consumer.as_bytes());
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn line<'a>(path: &'a str, consumer: &'a str) -> AccessLine<'a> {
        AccessLine {
            request_id: b"abc123",
            trace_id: [0xab; 16],
            method: "GET",
            path,
            status: 200,
            route: "api",
            service: "web",
            upstream: "web-1",
            tries: 1,
            bytes: 42,
            complete: true,
            duration: Duration::from_micros(1_234_567),
            client_ip: "10.1.2.3".parse().unwrap(),
            consumer,
        }
    }

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    #[test]
    fn dates_match_the_calendar() {
        assert_eq!(&second_text(0), b"1970-01-01T00:00:00");
        assert_eq!(&second_text(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&second_text(1_796_499_601), b"2026-12-05T19:40:01");
        assert_eq!(&second_text(4_107_542_399), b"2100-02-28T23:59:59");
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let mut out = Vec::new();
        format_json(&mut out, at(1_796_499_601, 7), &line("/x", "alice"));
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2026-12-05T19:40:01.007Z");
        assert_eq!(v["target"], "access");
        assert_eq!(v["request_id"], "abc123");
        assert_eq!(v["trace_id"], "ab".repeat(16));
        assert_eq!(v["path"], "/x");
        assert_eq!(v["status"], 200);
        assert_eq!(v["tries"], 1);
        assert_eq!(v["bytes"], 42);
        assert_eq!(v["complete"], true);
        assert_eq!(v["duration_ms"], 1234.567);
        assert_eq!(v["client_ip"], "10.1.2.3");
        assert_eq!(v["consumer"], "alice");
    }

    #[test]
    fn hostile_values_cannot_break_a_line_or_a_field() {
        let nasty = "a\"b\\c\nd\re\u{1}f\u{7f}ü";
        for json in [true, false] {
            let mut out = Vec::new();
            let l = line(nasty, nasty);
            if json {
                format_json(&mut out, at(0, 0), &l);
                let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
                assert_eq!(v["path"], nasty);
                assert_eq!(v["consumer"], nasty);
            } else {
                format_text(&mut out, at(0, 0), &l);
            }
            assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
            assert!(!out.contains(&b'\r'));
        }
    }

    #[test]
    fn the_word_check_finds_every_byte_that_needs_escaping() {
        for b in 0u8..=255 {
            for at in 0..8 {
                let mut eight = *b"abcdefgh";
                eight[at] = b;
                let expected = b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f;
                assert_eq!(
                    needs_escape(u64::from_le_bytes(eight)),
                    expected,
                    "byte {b:#x} at {at}"
                );
            }
        }
        let mut out = Vec::new();
        push_quoted(&mut out, b"0123456789abcdef\"/x");
        assert_eq!(out, b"\"0123456789abcdef\\\"/x\"");
    }

    #[test]
    fn a_text_line_reads_like_the_tracing_one() {
        let mut out = Vec::new();
        let mut l = line("/x", "");
        l.client_ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
        l.complete = false;
        format_text(&mut out, at(1_796_499_601, 250), &l);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-05T19:40:01.250Z  INFO access: request_id=\"abc123\" \
             trace_id=abababababababababababababababab method=\"GET\" \
             path=\"/x\" status=200 route=\"api\" service=\"web\" upstream=\"web-1\" tries=1 \
             bytes=42 complete=false duration_ms=1234.567 client_ip=::1 consumer=\"\"\n"
        );
    }

    fn settings(path: PathBuf, buffer_bytes: usize) -> AccessLogSettings {
        AccessLogSettings {
            format: LineFormat::Json,
            path: Some(path),
            buffer_bytes,
            flush_interval: Duration::from_millis(20),
        }
    }

    fn wait_for_lines(path: &std::path::Path, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let count = std::fs::read_to_string(path)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            if count >= n || Instant::now() > deadline {
                return count;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_from_many_threads_all_reach_the_file_within_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = Arc::new(AccessLog::start(settings(path.clone(), 1 << 20)).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                thread::spawn(move || {
                    for i in 0..500 {
                        let p = format!("/t{t}/{i}");
                        log.write(&line(&p, ""));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // The threads ended: their buffers are written all the same.
        assert_eq!(wait_for_lines(&path, 2000), 2000);
        let text = std::fs::read_to_string(&path).unwrap();
        for t in 0..4 {
            let mine: Vec<u32> = text
                .lines()
                .filter_map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let p = v["path"].as_str().unwrap().to_string();
                    p.strip_prefix(&format!("/t{t}/"))
                        .map(|n| n.parse().unwrap())
                })
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>(), "thread {t} in order");
        }
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn a_stalled_target_drops_and_counts_lines_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // A reader that opens the pipe but reads only when told: until then the pipe
        // fills and the writer thread blocks on it, as on a stalled disk or consumer.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let reader = {
            let fifo = fifo.clone();
            thread::spawn(move || {
                let mut pipe = File::open(fifo).unwrap();
                wait.recv().unwrap();
                let mut text = String::new();
                io::Read::read_to_string(&mut pipe, &mut text).unwrap();
                text.lines().count()
            })
        };
        let log = AccessLog::start(settings(fifo, 64 * 1024)).unwrap();
        let n = 50_000;
        for i in 0..n {
            log.write(&line(&format!("/{i}"), ""));
        }
        let dropped = log.dropped();
        assert!(dropped > 0, "a stalled target must cost lines, not waiting");
        go.send(()).unwrap();
        drop(log);
        let read = reader.join().unwrap();
        assert_eq!(read as u64 + dropped, n, "every line written or counted");
    }

    #[test]
    fn a_rotated_file_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(settings(path.clone(), 1 << 20)).unwrap();
        log.write(&line("/before", ""));
        assert_eq!(wait_for_lines(&path, 1), 1);
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() && Instant::now() < deadline {
            log.write(&line("/while", ""));
            thread::sleep(Duration::from_millis(50));
        }
        log.write(&line("/after", ""));
        drop(log);
        let old = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("/before"));
        assert!(new.contains("/after"), "new file: {new:?}");
    }
}
