//! Embeds an rpath to the libpython that pyo3 linked against, so the built
//! binary starts with an empty environment (no LD_LIBRARY_PATH needed).

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    println!("cargo:rerun-if-changed=build.rs");
}
