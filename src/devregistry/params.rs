//! Query-string parsing with Consul's rules: presence-based flags, Go durations and bools,
//! blocking (`index`/`wait`) and consistency parameters.

use std::time::Duration;

use super::error::ApiError;

/// Consul's default and maximum blocking wait, and its jitter fraction.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
const JITTER_FRACTION: u32 = 16;

/// Decoded query parameters, in request order (repeatable ones such as `tag` keep all values).
#[derive(Debug, Default, Clone)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        let pairs = raw
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Query { pairs }
    }

    /// First value of a parameter (`Some("")` when present without a value).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Presence-based flag: `?stale`, `?stale=`, `?stale=false` all mean "on", as in Consul.
    pub fn has(&self, key: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == key)
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Re-encoded like Go's `url.Values.Encode()` (sorted by key), for `Conflicting flags`.
    pub fn encode_sorted(&self) -> String {
        let mut pairs = self.pairs.clone();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &pairs {
            ser.append_pair(k, v);
        }
        ser.finish()
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or a bare `0`.
/// Returns signed nanoseconds.
pub fn parse_go_duration(s: &str) -> Option<i128> {
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return None;
        }
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let v: f64 = num.parse().ok()?;
        total += v * scale;
    }
    if total > i64::MAX as f64 {
        return None;
    }
    let ns = total as i128;
    Some(if neg { -ns } else { ns })
}

/// Formats a duration like Go's `time.Duration.String()` (`10s`, `1m30s`, `200ms`).
pub fn format_go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000_000_000 {
        return if ns % 1_000_000 == 0 {
            format!("{}ms", ns / 1_000_000)
        } else if ns % 1_000 == 0 {
            format!("{}µs", ns / 1_000)
        } else {
            format!("{ns}ns")
        };
    }
    let h = ns / 3_600_000_000_000;
    let m = (ns / 60_000_000_000) % 60;
    let s_ns = ns % 60_000_000_000;
    let secs = if s_ns % 1_000_000_000 == 0 {
        format!("{}s", s_ns / 1_000_000_000)
    } else {
        let frac = format!("{:09}", s_ns % 1_000_000_000);
        format!("{}.{}s", s_ns / 1_000_000_000, frac.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// A parsed blocking request: block while the result index is ≤ `min_index`, up to `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    pub min_index: u64,
    pub timeout: Duration,
}

/// `index` and `wait`, validated even when not blocking (as Consul's `parseWait` does).
pub fn blocking(q: &Query, jitter: bool) -> Result<Blocking, ApiError> {
    let min_index = match q.get("index") {
        None | Some("") => 0,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("Invalid index"))?,
    };
    let wait = match q.get("wait") {
        None | Some("") => None,
        Some(v) => {
            Some(parse_go_duration(v).ok_or_else(|| ApiError::bad_request("Invalid wait time"))?)
        }
    };
    let mut timeout = match wait {
        Some(ns) if ns > MAX_WAIT.as_nanos() as i128 => MAX_WAIT,
        Some(ns) if ns > 0 => Duration::from_nanos(ns as u64),
        _ => DEFAULT_WAIT,
    };
    if jitter {
        let span = timeout / JITTER_FRACTION;
        if !span.is_zero() {
            let extra = rand::random_range(0..span.as_nanos() as u64);
            timeout += Duration::from_nanos(extra);
        }
    }
    Ok(Blocking { min_index, timeout })
}

/// Read consistency mode, spelled like its query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Leader,
    Stale,
    Consistent,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Leader => "leader",
            Consistency::Stale => "stale",
            Consistency::Consistent => "consistent",
        }
    }
}

pub fn consistency(q: &Query) -> Result<Consistency, ApiError> {
    let stale = q.has("stale");
    let consistent = q.has("consistent");
    if stale && consistent {
        return Err(ApiError::bad_request(
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    if q.has("cached") && consistent {
        return Err(ApiError::bad_request(
            "Cannot specify ?cached with ?consistent, conflicting semantics.",
        ));
    }
    if let Some(v) = q.get("max_stale") {
        if parse_go_duration(v).is_none() {
            return Err(ApiError::bad_request(format!(
                "Invalid max_stale value {v:?}"
            )));
        }
        if consistent {
            return Err(ApiError::bad_request(
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        return Ok(Consistency::Stale);
    }
    Ok(if stale {
        Consistency::Stale
    } else if consistent {
        Consistency::Consistent
    } else {
        Consistency::Leader
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_go() {
        let cases: &[(&str, Option<i128>)] = &[
            ("10s", Some(10_000_000_000)),
            ("300000ms", Some(300_000_000_000)),
            ("1m30s", Some(90_000_000_000)),
            ("1.5h", Some(5_400_000_000_000)),
            ("200ms", Some(200_000_000)),
            ("1us", Some(1_000)),
            ("1µs", Some(1_000)),
            ("0", Some(0)),
            ("-5s", Some(-5_000_000_000)),
            ("", None),
            ("10", None),
            ("abc", None),
            ("5x", None),
            ("s", None),
            ("1..2s", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_go_duration(s), *want, "{s}");
        }
    }

    #[test]
    fn go_durations_format_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn wait_is_clamped_to_the_maximum_and_defaults_when_absent_or_zero() {
        let b = |s: &str| blocking(&Query::parse(Some(s)), false).unwrap();
        assert_eq!(b("index=5&wait=20m").timeout, MAX_WAIT);
        assert_eq!(b("index=5").timeout, DEFAULT_WAIT);
        assert_eq!(b("index=5&wait=0s").timeout, DEFAULT_WAIT);
        assert_eq!(b("index=5&wait=-1s").timeout, DEFAULT_WAIT);
        assert_eq!(b("index=5&wait=1m30s").timeout, Duration::from_secs(90));
        assert_eq!(b("index=5").min_index, 5);
    }

    #[test]
    fn jitter_stays_below_a_sixteenth_of_the_wait() {
        for _ in 0..200 {
            let t = blocking(&Query::parse(Some("index=1&wait=16s")), true)
                .unwrap()
                .timeout;
            assert!(
                t >= Duration::from_secs(16) && t < Duration::from_secs(17),
                "{t:?}"
            );
        }
    }

    #[test]
    fn bad_index_and_wait_are_rejected() {
        assert!(blocking(&Query::parse(Some("index=abc")), false).is_err());
        assert!(blocking(&Query::parse(Some("index=-1")), false).is_err());
        assert!(blocking(&Query::parse(Some("wait=10")), false).is_err());
    }

    #[test]
    fn flags_are_presence_based() {
        let q = Query::parse(Some("stale=&recurse=false&tag=a&tag=b"));
        assert!(q.has("stale") && q.has("recurse"));
        assert_eq!(q.all("tag"), vec!["a", "b"]);
        assert_eq!(consistency(&q).unwrap(), Consistency::Stale);
        assert!(consistency(&Query::parse(Some("stale&consistent"))).is_err());
        assert!(consistency(&Query::parse(Some("cached&consistent"))).is_err());
    }
}
