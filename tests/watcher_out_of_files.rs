//! The flow watcher when the process is out of file descriptors: it cannot read the flows
//! directory, and that must change nothing — no flow stopped or removed because the daemon
//! could not look. (A file of its own: the test lowers the whole process's open-file limit.)

use std::time::Duration;

use flowbus_runtime::activity::Filter;
use flowbus_runtime::config::Config;
use flowbus_runtime::daemon::{Daemon, FlowState};

fn tick_flow(name: &str) -> String {
    serde_json::json!({
        "name": name,
        "nodes": [
            {"id": "t", "type": "Timer", "interval": "50ms"},
            {"id": "show", "type": "Trace", "pattern": "tick"}
        ],
        "connections": [{"from": "t.Out", "to": "show"}]
    })
    .to_string()
}

fn count(d: &Daemon, number: &str) -> usize {
    d.services()
        .activity
        .query(&Filter {
            number: Some(number.into()),
            ..Filter::default()
        })
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_out_of_file_descriptors_changes_nothing() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("watcher-emfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    for name in ["a", "b"] {
        std::fs::write(dir.join(format!("flows/{name}.json")), tick_flow(name)).unwrap();
    }
    std::fs::write(
        dir.join("flowbus.toml"),
        "flows = [\"flows\"]\n[daemon]\nwatch = false\n",
    )
    .unwrap();
    let config = Config::load(&dir.join("flowbus.toml")).unwrap();
    let d = Daemon::new(config, flowbus_nodes::registry());
    assert!(d.start_all().await.is_empty());
    let deployed = count(&d, "BIP1005");
    assert_eq!(deployed, 2);

    // Out of descriptors: a soft limit just above what is open, then filled up.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let low = libc::rlimit {
        rlim_cur: open_now + 16,
        rlim_max: old.rlim_max,
    };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
    }
    assert!(std::fs::read_dir(dir.join("flows")).is_err());
    d.check_files().await;
    d.check_files().await;
    drop(hog);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);

    for f in d.flows() {
        assert_eq!(f.state, FlowState::Running, "{f:?}");
    }
    assert_eq!(count(&d, "BIP1006"), 0, "no flow removed");
    let warned = d.services().activity.query(&Filter {
        number: Some("BIP1010".into()),
        ..Filter::default()
    });
    assert_eq!(
        warned.len(),
        1,
        "one warning, not one per check: {warned:?}"
    );
    assert!(
        warned[0].message.contains("every flow keeps running"),
        "{}",
        warned[0].message
    );
    // Descriptors back: the next look finds nothing changed, so nothing is redeployed.
    d.check_files().await;
    assert_eq!(count(&d, "BIP1005"), deployed, "nothing redeployed");
    assert_eq!(d.flows().len(), 2);
    d.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
