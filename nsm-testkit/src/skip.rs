//! Whether the tests that need the kernel can run here.

use crate::lab::run;

/// Whether this process can run tests that make namespaces and ping through them:
/// root, with `ip` and `ping` present. When not, prints why (`skipped: <what> need
/// root, ip and ping (...)`) so a skipped test says so in the test output.
pub fn can_run(what: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the process's effective uid.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let tools = run("ip", &["-V"]).0 && run("ping", &["-V"]).0;
    if !root || !tools {
        eprintln!("skipped: {what} need root, ip and ping (root={root}, tools={tools})");
    }
    root && tools
}

/// Returns from the calling test (which passes) when [`can_run`] says the kernel tests
/// cannot run here; `what` names the suite in the skip line.
#[macro_export]
macro_rules! require_root {
    ($what:expr) => {
        if !$crate::can_run($what) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn can_run_agrees_with_the_effective_uid_and_the_tools() {
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let tools = run("ip", &["-V"]).0 && run("ping", &["-V"]).0;
        assert_eq!(can_run("kit tests"), root && tools);
    }
}
