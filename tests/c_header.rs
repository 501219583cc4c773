//! `include/pyipcd_shm.h` stands alone: strict C11/C17 and C++17 under gcc,
//! clang, g++ and clang++ with `-Wall -Wextra -Werror -pedantic`, no
//! feature-test macro, included first or after other system headers
//! (tests/fixtures/c/header_*). Each build then runs the fixture, which
//! exercises every public function against a channel file it lays out itself.

use std::process::Command;

fn installed(compiler: &str) -> bool {
    Command::new(compiler)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_c_header_compiles_strictly_as_c_and_cpp_and_runs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let flags = ["-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"];
    let mut cases = Vec::new();
    for cc in ["gcc", "clang"] {
        for std in ["c11", "c17", "gnu11"] {
            for fixture in ["header_standalone.c", "header_first.c"] {
                cases.push((cc, std, fixture));
            }
        }
    }
    for cxx in ["g++", "clang++"] {
        for fixture in ["header_standalone.cpp", "header_first.cpp"] {
            cases.push((cxx, "c++17", fixture));
        }
    }
    // CI installs all four; elsewhere a missing one is skipped, said aloud.
    let required = std::env::var_os("CI").is_some();
    let mut ran = 0;
    for compiler in ["gcc", "clang", "g++", "clang++"] {
        if !installed(compiler) {
            assert!(
                !required,
                "{compiler} is not installed (.ci/run installs it)"
            );
            eprintln!("note: {compiler} is not installed; its cases are skipped");
        }
    }
    for (compiler, std, fixture) in cases {
        if !installed(compiler) {
            continue;
        }
        let exe = dir
            .path()
            .join(format!("{compiler}-{std}-{fixture}").replace(['+', '.'], "_"));
        let out = Command::new(compiler)
            .arg(format!("-std={std}"))
            .args(flags)
            .arg("-I")
            .arg(format!("{root}/include"))
            .arg("-o")
            .arg(&exe)
            .arg(format!("{root}/tests/fixtures/c/{fixture}"))
            .output()
            .expect(compiler);
        assert!(
            out.status.success(),
            "{compiler} -std={std} {fixture} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = Command::new(&exe).current_dir(dir.path()).output().unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success() && stdout.contains("header_standalone: ok"),
            "{compiler} -std={std} {fixture}: the build ran and failed:\n{stdout}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        ran += 1;
    }
    assert!(
        ran >= 6,
        "gcc at least must build the header ({ran} builds ran)"
    );
}
