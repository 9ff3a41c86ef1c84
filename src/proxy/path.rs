//! Request path normalisation, done once before routing so that the path a route matched
//! is exactly the path the upstream receives: `/public/../admin`, `/public/%2e%2e/admin`
//! or `//admin` cannot reach a route other than the one they appear to be under.
//!
//! Rules (RFC 3986 §6.2.2 plus what Envoy calls `merge_slashes`): percent-encoded
//! unreserved characters are decoded, other escapes are kept with upper-case hex, empty
//! segments are merged, `.` and `..` segments are resolved (never above the root). An
//! encoded `/` (`%2F`) stays encoded and is not a segment boundary. Invalid escapes, NUL,
//! backslashes and control characters are refused.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    #[error("forbidden character in the path")]
    Forbidden,
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
                    || rest[0] == b'/'
                    || (rest[0] == b'.' && (rest.len() == 1 || rest[1] == b'/'))
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
    fn broken_or_dangerous_paths_are_refused() {
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00b"), Err(PathError::Forbidden));
        assert_eq!(normalize("/a\\..\\b"), Err(PathError::Forbidden));
        assert_eq!(normalize("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
    }
}
