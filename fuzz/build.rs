//! The targets link libpython through pyipcd: carry an rpath to it, as the
//! daemon does, so they run without LD_LIBRARY_PATH.
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
