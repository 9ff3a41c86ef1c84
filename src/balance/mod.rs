//! Which endpoint takes this request: the balancing algorithms and passive outlier ejection.
