//! A strict reader of the Prometheus text exposition format, for the tests that read the
//! admin `/metrics` endpoint: every counter they assert is parsed from the text a scraper
//! would get, not read from the process.

use std::collections::BTreeMap;

/// One sample line of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A strict reader of the Prometheus text exposition format (0.0.4): `# HELP`, `# TYPE`,
/// samples `name{label="value",...} value [timestamp]`; every sample's family must have
/// been typed before it. Panics naming the first bad line.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", n + 1) };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            let name = parts
                .next()
                .unwrap_or_else(|| bad("comment without a name"));
            if !valid_name(name) {
                bad("bad metric name");
            }
            let arg = parts.next().unwrap_or("");
            match keyword {
                "HELP" => {}
                "TYPE" => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                        bad("unknown type");
                    }
                    if types.insert(name.to_string(), arg.to_string()).is_some() {
                        bad("family typed twice");
                    }
                }
                _ => bad("comment is neither HELP nor TYPE"),
            }
            continue;
        }
        if line.starts_with('#') {
            bad("comment without a space");
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
        let name = &line[..name_end];
        if !valid_name(name) {
            bad("bad metric name");
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                match chars.peek() {
                    Some((_, '}')) => {
                        chars.next();
                        break;
                    }
                    None => bad("unterminated labels"),
                    _ => {}
                }
                let start = chars.peek().map(|(i, _)| *i).unwrap_or(0);
                let mut eq = None;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        eq = Some(i);
                        break;
                    }
                }
                let eq = eq.unwrap_or_else(|| bad("label without '='"));
                let key = &body[start..eq];
                if !valid_label(key) {
                    bad("bad label name");
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    bad("label value not quoted");
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => bad("bad escape in a label value"),
                        },
                        Some((_, c)) => value.push(c),
                        None => bad("unterminated label value"),
                    }
                }
                if labels.insert(key.to_string(), value).is_some() {
                    bad("label repeated");
                }
                match chars.next() {
                    Some((_, ',')) => {}
                    Some((_, '}')) => break,
                    _ => bad("expected ',' or '}' after a label"),
                }
            }
            let consumed = chars.peek().map(|(i, _)| *i).unwrap_or(body.len());
            rest = &body[consumed..];
        }
        let rest = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| bad("no space before the value"));
        let mut fields = rest.split(' ');
        let value = match fields.next().unwrap_or("") {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| bad("timestamp is not an integer"));
        }
        if fields.next().is_some() {
            bad("trailing fields");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|base| {
                    types
                        .get(*base)
                        .is_some_and(|t| t == "histogram" || t == "summary")
                })
            })
            .unwrap_or(name);
        match types.get(family).map(String::as_str) {
            None => bad("sample before its # TYPE"),
            Some("counter") if value < 0.0 => bad("negative counter"),
            Some("histogram") if name.ends_with("_bucket") && !labels.contains_key("le") => {
                bad("bucket without le")
            }
            _ => {}
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The sum of every sample of `name` whose labels include `with`.
pub fn total(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}
