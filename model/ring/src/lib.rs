//! See tests/ring.rs.
