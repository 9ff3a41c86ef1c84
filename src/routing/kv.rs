//! Watches `<prefix>routes/` and keeps the last good document per key.
