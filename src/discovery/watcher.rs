//! One health watch per routed service, feeding instance lists to the snapshot writer.
