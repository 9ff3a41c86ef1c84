//! Edge policy per route: rate limits, IP rules, CORS and request limits.
