//! Records the git revision for `relay --version` as `RELAY_GIT_REVISION`:
//! `git rev-parse --short HEAD`, or `unknown` where git or `.git` is absent
//! (a Docker build context without `.git`, a source tarball).
//! `RELAY_GIT_REVISION` set in the build's environment wins, so such builds
//! can still pass it in (the Dockerfile's build argument of that name).
//! The cost: a commit or checkout reruns this script, which rebuilds the
//! crate (not its dependencies) on the next cargo build.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (output.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=RELAY_GIT_REVISION");
    let revision = match std::env::var("RELAY_GIT_REVISION") {
        Ok(given) if !given.is_empty() => given,
        _ => git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_string()),
    };
    // Rerun when HEAD moves (a commit, a checkout). `--git-path` resolves
    // inside a worktree too; only existing files (a missing one would rerun
    // the script, and rebuild the crate, on every build).
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(head_ref);
    }
    for file in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &file]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rustc-env=RELAY_GIT_REVISION={revision}");
}
