//! The real binary's `--check`: the shipped example passes, a bad file names the field and
//! exits 1, a bad command line exits 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn log_shipper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_log-shipper"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("example.yaml")
}

#[test]
fn check_accepts_the_example() {
    let example = example();
    let out = log_shipper(&["--config", example.to_str().expect("utf-8 path"), "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains(": ok ("), "{stdout}");
    assert!(
        stdout.contains("http://logging.{namespace}.svc:3100/vali/api/v1/push"),
        "{stdout}"
    );
}

#[test]
fn check_names_the_bad_field() {
    let text = std::fs::read_to_string(example())
        .expect("example")
        .replace(
            "protocol: loki}  # per shoot",
            "protocol: vali}  # per shoot",
        );
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("log-shipper-bad.yaml");
    std::fs::write(&path, text).expect("write the bad config");
    let out = log_shipper(&["--config", path.to_str().expect("utf-8 path"), "--check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("stores.shoot.protocol: unknown variant `vali`"),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_missing_file_and_a_bad_command_line() {
    let out = log_shipper(&["--config", "/nonexistent/log-shipper.yaml", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/log-shipper.yaml"));
    assert_eq!(log_shipper(&["--check"]).status.code(), Some(2));
}
