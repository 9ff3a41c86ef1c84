//! `switchyard status`: the dashboard's picture in a terminal, for SSH sessions and
//! scripts. It reads `/dashboard.json` from a running gateway's admin listener (the same
//! answer the page draws) and prints routes with their last minute of traffic, instances,
//! the Consul connection and the routes with the most errors; `--json` prints the answer
//! as it came. Exit status: 0 healthy, 2 when the gateway is not ready or its Consul data
//! is stale, 1 when no picture could be had (unreachable, token refused).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Exit status when the gateway answered but is not ready or serves stale data.
pub const EXIT_DEGRADED: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("admin address {0:?}: {1}")]
    Address(String, String),
    #[error("token file {0}: {1}")]
    TokenFile(String, String),
    #[error("cannot reach the admin listener at {0}: {1}")]
    Unreachable(String, String),
    #[error("the admin listener at {0} needs its token (--token-file) or refused the one given")]
    Unauthorized(String),
    #[error("the admin listener at {0} answered {1}: {2}")]
    Status(String, u16, String),
    #[error("the admin listener at {0} answered something other than the dashboard's JSON: {1}")]
    Decode(String, String),
}

/// `host:port` or a URL, to the `/dashboard.json` URL.
pub fn dashboard_url(admin: &str) -> Result<url::Url, StatusError> {
    let base = if admin.contains("://") {
        admin.to_string()
    } else {
        format!("http://{admin}")
    };
    let url =
        url::Url::parse(&base).map_err(|e| StatusError::Address(admin.into(), e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(StatusError::Address(
            admin.into(),
            "expected host:port or http(s)://host:port".into(),
        ));
    }
    url.join("/dashboard.json?series=none")
        .map_err(|e| StatusError::Address(admin.into(), e.to_string()))
}

/// The token in a file (trimmed), as the gateway reads its own `admin.token_file`.
pub fn read_token(path: &Path) -> Result<String, StatusError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StatusError::TokenFile(path.display().to_string(), e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StatusError::TokenFile(
            path.display().to_string(),
            "the file holds no token".into(),
        ));
    }
    Ok(token.to_string())
}

/// Reads `/dashboard.json` once (5 s at most).
pub async fn fetch(admin: &str, token: Option<&str>) -> Result<Value, StatusError> {
    let url = dashboard_url(admin)?;
    let shown = url.origin().ascii_serialization();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| StatusError::Unreachable(shown.clone(), e.to_string()))?;
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| StatusError::Unreachable(shown.clone(), error_chain(&e)))?;
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .map_err(|e| StatusError::Unreachable(shown.clone(), error_chain(&e)))?;
    if status == 401 {
        return Err(StatusError::Unauthorized(shown));
    }
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        return Err(StatusError::Status(
            shown,
            status,
            text.trim().chars().take(200).collect(),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| StatusError::Decode(shown, e.to_string()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// Whether the picture is healthy: ready, and Consul data not stale.
pub fn healthy(d: &Value) -> bool {
    d["ready"]["ready"].as_bool() == Some(true) && d["consul"]["stale"].as_bool() == Some(false)
}

fn age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) if s < 60.0 => format!("{s:.1} s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}ms"),
        Some(v) if v < 1000.0 => format!("{v:.0}ms"),
        Some(v) => format!("{:.2}s", v / 1000.0),
    }
}

fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        return "-".into();
    }
    let p = 100.0 * n as f64 / total as f64;
    if n == 0 {
        "0%".into()
    } else if p < 0.1 {
        "<0.1%".into()
    } else {
        format!("{p:.1}%")
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Rows as aligned columns (the last column is not padded).
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut text = String::from("  ");
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// The picture as text.
pub fn render(d: &Value, admin: &str) -> String {
    let mut out = String::new();
    let ready = &d["ready"];
    let _ = writeln!(
        out,
        "Switchyard {} at {admin}: {} ({})",
        s(&d["gateway"]["version"]),
        if ready["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        },
        s(&ready["reason"])
    );
    let c = &d["consul"];
    let failing: Vec<String> = c["watches"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["consecutive_errors"].as_u64().unwrap_or(0) > 0)
                .map(|w| {
                    format!(
                        "{} ({})",
                        s(&w["name"]),
                        w["last_error"].as_str().unwrap_or("failing")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let agent = c["agents"]["active"].as_str().unwrap_or(s(&c["address"]));
    let _ = writeln!(
        out,
        "Consul   {agent} · {} · last answer {} ago · data age {} (stale after {}){}",
        if failing.is_empty() && c["last_contact_s"].is_f64() {
            "live"
        } else {
            "FAILING"
        },
        age(c["last_contact_s"].as_f64()),
        age(c["data_age_s"].as_f64()),
        age(c["stale_after_s"].as_f64()),
        if c["stale"].as_bool() == Some(true) {
            " · STALE: serving the last good state"
        } else {
            ""
        }
    );
    if !failing.is_empty() {
        let _ = writeln!(out, "         failing watches: {}", failing.join(", "));
    }
    let snap = &d["snapshot"];
    let changed = match (
        d["generated_at_unix_ms"].as_u64(),
        snap["published_at_unix_ms"].as_u64(),
    ) {
        (Some(now), Some(at)) => format!(
            " · changed {} ago",
            age(Some(now.saturating_sub(at) as f64 / 1000.0))
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "Snapshot v{}{changed} · from {}",
        snap["version"].as_u64().unwrap_or(0),
        s(&snap["source"]).replace('_', " ")
    );

    let routes = d["routes"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nROUTES ({})", routes.len());
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            let m = &r["traffic"]["last_minute"];
            let n = m["requests"].as_u64().unwrap_or(0);
            let methods = strs(&r["methods"]);
            let mut matched = format!(
                "{}{}",
                r["host"].as_str().unwrap_or("*"),
                s(&r["path_prefix"])
            );
            if !methods.is_empty() {
                let _ = write!(matched, " {}", methods.join(","));
            }
            let service = if r["redirect"].is_null() {
                s(&r["service"]).to_string()
            } else {
                "(redirect)".into()
            };
            let mut auth: Vec<String> = strs(&r["auth"]["jwt"])
                .iter()
                .map(|p| format!("jwt:{p}"))
                .collect();
            if r["auth"]["api_key"].as_bool() == Some(true) {
                auth.push("api-key".into());
            }
            vec![
                s(&r["name"]).to_string(),
                matched,
                service,
                r["upstreams"].as_u64().unwrap_or(0).to_string(),
                if auth.is_empty() {
                    "public".into()
                } else {
                    auth.join("|")
                },
                format!(
                    "{:.1}",
                    r["traffic"]["requests_per_s"].as_f64().unwrap_or(0.0)
                ),
                pct(m["client_errors"].as_u64().unwrap_or(0), n),
                pct(m["server_errors"].as_u64().unwrap_or(0), n),
                pct(m["gateway_errors"].as_u64().unwrap_or(0), n),
                ms(m["p50_ms"].as_f64()),
                ms(m["p99_ms"].as_f64()),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "NAME", "MATCH", "SERVICE", "INST", "AUTH", "REQ/S", "4XX", "5XX", "GATEWAY", "P50",
            "P99",
        ],
        &rows,
    );

    if let Some(rejected) = d["rejected"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(out, "\nREJECTED DOCUMENTS ({})", rejected.len());
        for r in rejected {
            let in_use = if r["serving_last_good"].as_bool() == Some(true) {
                match r["last_good_modify_index"].as_u64() {
                    Some(i) => format!("serving the last good version (index {i})"),
                    None => "serving the last good version".into(),
                }
            } else {
                "nothing serves this key".into()
            };
            let _ = writeln!(out, "  {}: {} [{in_use}]", s(&r["key"]), s(&r["error"]));
        }
    }
    if let Some(conflicts) = d["conflicts"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(out, "\nCONFLICTS ({})", conflicts.len());
        for c in conflicts {
            let _ = writeln!(
                out,
                "  {} is shadowed by {}",
                s(&c["route"]),
                s(&c["shadowed_by"])
            );
        }
    }

    let services = d["services"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nINSTANCES");
    let mut rows = Vec::new();
    for svc in &services {
        for i in svc["instances"].as_array().into_iter().flatten() {
            let ejected = i["ejected"].as_bool() == Some(true);
            let why = if ejected {
                format!(
                    "ejected {} more after {} consecutive failures",
                    age(i["ejected_for_ms"].as_f64().map(|v| v / 1000.0)),
                    i["consecutive_failures"].as_u64().unwrap_or(0)
                )
            } else {
                String::new()
            };
            rows.push(vec![
                s(&svc["service"]).to_string(),
                s(&i["id"]).to_string(),
                format!("{}:{}", s(&i["address"]), i["port"].as_u64().unwrap_or(0)),
                if ejected {
                    "ejected".into()
                } else {
                    s(&i["health"]).to_string()
                },
                i["weight"].as_u64().unwrap_or(0).to_string(),
                i["in_flight"].as_u64().unwrap_or(0).to_string(),
                why,
            ]);
        }
        for o in svc["out_of_service"].as_array().into_iter().flatten() {
            rows.push(vec![
                s(&svc["service"]).to_string(),
                s(&o["id"]).to_string(),
                format!("{}:{}", s(&o["address"]), o["port"].as_u64().unwrap_or(0)),
                s(&o["health"]).to_string(),
                "-".into(),
                "-".into(),
                strs(&o["checks"]).join(", "),
            ]);
        }
        if svc["instances"].as_array().is_none_or(Vec::is_empty)
            && svc["out_of_service"].as_array().is_none_or(Vec::is_empty)
        {
            rows.push(vec![
                s(&svc["service"]).to_string(),
                "(none registered)".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
    table(
        &mut out,
        &[
            "SERVICE",
            "INSTANCE",
            "ADDRESS",
            "HEALTH",
            "WEIGHT",
            "IN-FLIGHT",
            "WHY",
        ],
        &rows,
    );

    let mut errors: Vec<(u64, u64, &Value)> = routes
        .iter()
        .filter_map(|r| {
            let m = &r["traffic"]["last_minute"];
            let n = m["requests"].as_u64()?;
            let bad =
                m["client_errors"].as_u64().unwrap_or(0) + m["server_errors"].as_u64().unwrap_or(0);
            (bad > 0).then_some((bad, n, r))
        })
        .collect();
    errors.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| s(&a.2["name"]).cmp(s(&b.2["name"])))
    });
    let _ = writeln!(out, "\nTOP ERRORS (last minute)");
    if errors.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (bad, n, r) in errors.iter().take(5) {
        let m = &r["traffic"]["last_minute"];
        let _ = writeln!(
            out,
            "  {}: {bad} of {n} requests failed ({}) · 4xx {} · 5xx {} · by the gateway {}",
            s(&r["name"]),
            pct(*bad, *n),
            m["client_errors"].as_u64().unwrap_or(0),
            m["server_errors"].as_u64().unwrap_or(0),
            m["gateway_errors"].as_u64().unwrap_or(0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_become_the_dashboard_url() {
        assert_eq!(
            dashboard_url("127.0.0.1:9901").unwrap().as_str(),
            "http://127.0.0.1:9901/dashboard.json?series=none"
        );
        assert_eq!(
            dashboard_url("https://gw.example:9901/").unwrap().as_str(),
            "https://gw.example:9901/dashboard.json?series=none"
        );
        assert_eq!(
            dashboard_url("[::1]:9901").unwrap().as_str(),
            "http://[::1]:9901/dashboard.json?series=none"
        );
        assert!(dashboard_url("ftp://x").is_err());
        assert!(dashboard_url("").is_err());
    }

    #[test]
    fn the_picture_names_routes_instances_and_errors() {
        let d = serde_json::json!({
            "generated_at_unix_ms": 10_000, "gateway": {"version": "9.9.9"},
            "ready": {"ready": true, "reason": "serving"},
            "snapshot": {"version": 7, "published_at_unix_ms": 4_000, "source": "consul"},
            "consul": {"address": "http://c:8500", "agents": {"active": "http://c:8500"},
                "last_contact_s": 0.5, "data_age_s": 0.0, "stale_after_s": 10.0, "stale": false,
                "watches": [{"name": "routes", "consecutive_errors": 0}]},
            "routes": [{"name": "users", "host": null, "path_prefix": "/users", "methods": ["GET"],
                "service": "users", "redirect": null, "upstreams": 2, "auth": {"jwt": ["corp"], "api_key": false},
                "traffic": {"requests_per_s": 2.0, "last_minute": {"requests": 120, "client_errors": 3,
                    "server_errors": 1, "gateway_errors": 1, "p50_ms": 1.5, "p99_ms": 40.0}}}],
            "rejected": [{"key": "sy/routes/bad", "error": "invalid JSON", "serving_last_good": true,
                "last_good_modify_index": 12}],
            "conflicts": [],
            "services": [{"service": "users", "instances": [{"id": "n1/u1", "address": "10.0.0.1",
                "port": 80, "health": "passing", "weight": 1, "in_flight": 0, "ejected": false}],
                "out_of_service": [{"id": "n1/u2", "address": "10.0.0.2", "port": 80,
                "health": "critical", "checks": ["http (critical)"]}]}],
        });
        let text = render(&d, "127.0.0.1:9901");
        assert!(
            text.contains("Switchyard 9.9.9 at 127.0.0.1:9901: ready"),
            "{text}"
        );
        assert!(text.contains("changed 6.0 s ago"), "{text}");
        assert!(text.contains("/users GET"), "{text}");
        assert!(text.contains("jwt:corp"), "{text}");
        assert!(
            text.contains("sy/routes/bad: invalid JSON [serving the last good version (index 12)]")
        );
        assert!(
            text.contains("n1/u2") && text.contains("critical") && text.contains("http (critical)")
        );
        assert!(
            text.contains("users: 4 of 120 requests failed (3.3%)"),
            "{text}"
        );
        assert!(healthy(&d));
        let mut stale = d.clone();
        stale["consul"]["stale"] = true.into();
        assert!(!healthy(&stale));
        assert!(render(&stale, "x").contains("STALE"));
    }
}
