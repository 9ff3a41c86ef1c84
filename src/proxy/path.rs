//! Request path normalisation, done once before routing so that the path a route matched
//! is exactly the path the upstream receives: `/public/../admin`, `/public/%2e%2e/admin`
//! or `//admin` cannot reach a route other than the one they appear to be under.
//!
//! Rules (RFC 3986 §6.2.2 plus what Envoy calls `merge_slashes`): percent-encoded
//! unreserved characters are decoded, other escapes are kept with upper-case hex, empty
//! segments are merged, `.` and `..` segments are resolved (never above the root). An
//! encoded `/` or `\` (`%2F`, `%5C`) stays encoded and is not a segment boundary here;
//! since an upstream may decode it into one, the handler serves such paths only on
//! routes that say how ([`has_escaped_slash`], [`decode_escaped_slashes`]; Envoy's
//! `path_with_escaped_slashes_action`). Invalid escapes, NUL, backslashes, control
//! characters and dot segments with parameters (`..;x`, which Tomcat reads as `..`) are
//! refused.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    #[error("forbidden character in the path")]
    Forbidden,
    #[error("a dot segment with parameters in the path")]
    DotParameters,
}

/// The normalised form of `path` (without query); borrowed when already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path.as_bytes())? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path.as_bytes())?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s if is_dot_with_parameters(s) => return Err(PathError::DotParameters),
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Fast path: no escapes, no empty or dot segments, only allowed bytes.
fn is_normal(bytes: &[u8]) -> Result<bool, PathError> {
    let mut normal = true;
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        check_byte(b)?;
        match b {
            b'%' => normal = false,
            b'/' if prev == b'/' => normal = false,
            b'.' if prev == b'/' => {
                let rest = &bytes[i + 1..];
                if rest.is_empty()
                    || matches!(rest[0], b'/' | b';')
                    || (rest[0] == b'.' && (rest.len() == 1 || matches!(rest[1], b'/' | b';')))
                {
                    normal = false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    Ok(normal)
}

/// `.;x` or `..;x`: a dot segment to servers that drop path parameters.
fn is_dot_with_parameters(segment: &str) -> bool {
    matches!(segment.split(';').next(), Some("." | ".."))
}

/// Whether a normalised path holds an encoded slash or backslash.
pub fn has_escaped_slash(normal: &str) -> bool {
    normal
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && (w[1] == b'2' && w[2] == b'F' || w[1] == b'5' && w[2] == b'C'))
}

/// The path an upstream that decodes `%2F` and `%5C` would see, as separators, normalised
/// again (so `/a/..%2Fb` becomes `/b`).
pub fn decode_escaped_slashes(normal: &str) -> Result<String, PathError> {
    let decoded = normal.replace("%2F", "/").replace("%5C", "/");
    normalize(&decoded).map(Cow::into_owned)
}

fn check_byte(b: u8) -> Result<(), PathError> {
    if b < 0x21 || b == 0x7f || b == b'\\' || b >= 0x80 {
        return Err(PathError::Forbidden);
    }
    Ok(())
}

fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b as char);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
        let value = hex_value(hex[0])
            .zip(hex_value(hex[1]))
            .map(|(h, l)| h << 4 | l)
            .ok_or(PathError::BadEscape)?;
        if value == 0 {
            return Err(PathError::Forbidden);
        }
        if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
            out.push(value as char);
        } else {
            out.push('%');
            out.push(hex[0].to_ascii_uppercase() as char);
            out.push(hex[1].to_ascii_uppercase() as char);
        }
        i += 3;
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/api",
            "/api/v1/users",
            "/a/b.json",
            "/a/.well-known/x",
            "/a..b/c",
        ] {
            assert!(matches!(normalize(p).unwrap(), Cow::Borrowed(_)), "{p}");
            assert_eq!(n(p), p);
        }
    }

    #[test]
    fn dot_segments_and_double_slashes_are_resolved() {
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/public/./x"), "/public/x");
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("//admin//x"), "/admin/x");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a/"), "/a/");
    }

    #[test]
    fn encoded_dots_count_as_dots() {
        assert_eq!(n("/public/%2e%2e/admin"), "/admin");
        assert_eq!(n("/public/%2E%2e/admin"), "/admin");
        assert_eq!(n("/public/.%2e/admin"), "/admin");
        assert_eq!(n("/%7euser"), "/~user");
    }

    #[test]
    fn encoded_slashes_stay_inside_their_segment() {
        assert_eq!(n("/public/..%2fadmin"), "/public/..%2Fadmin");
        assert_eq!(n("/a%2f..%2fb"), "/a%2F..%2Fb");
        assert_eq!(n("/q%20x"), "/q%20x");
    }

    #[test]
    fn escaped_slashes_are_found_and_decoded_into_separators() {
        for p in ["/a%2fb", "/a%2Fb", "/a%5cb", "/public/..%2fprivate/x"] {
            assert!(has_escaped_slash(&n(p)), "{p}");
        }
        for p in ["/a/b", "/a%252fb", "/a%20b", "/%2"] {
            assert!(!normalize(p).is_ok_and(|n| has_escaped_slash(&n)), "{p}");
        }
        let d = |p: &str| decode_escaped_slashes(&n(p)).unwrap();
        assert_eq!(d("/public/..%2fprivate/x"), "/private/x");
        assert_eq!(d("/a%2Fb%5Cc"), "/a/b/c");
        assert_eq!(d("/a%2F%2F..%2F..%2Fetc"), "/etc");
        assert_eq!(d("/a%252Fb"), "/a%252Fb", "decoded once only");
    }

    #[test]
    fn dot_segments_with_parameters_are_refused() {
        for p in [
            "/public/..;/admin",
            "/a/.;x/b",
            "/a/..;jsessionid=1",
            "/%2e%2e;/x",
        ] {
            assert_eq!(normalize(p), Err(PathError::DotParameters), "{p}");
        }
        assert_eq!(n("/a;v=1/b"), "/a;v=1/b");
        assert_eq!(n("/a/..b;x"), "/a/..b;x");
    }

    #[test]
    fn broken_or_dangerous_paths_are_refused() {
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00b"), Err(PathError::Forbidden));
        assert_eq!(normalize("/a\\..\\b"), Err(PathError::Forbidden));
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
    }
}
