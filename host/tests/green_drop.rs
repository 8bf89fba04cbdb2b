//! Dropping a fiber suspended mid-run (found by review). The frames on its stack never run
//! again, nor do their destructors; safe code relies on those destructors before a borrowed
//! frame goes away (`std::thread::scope` joins its threads in its destructor). Unmapping the
//! stack then was a use after free in safe code: a scoped thread kept reading a local of the
//! fiber's stack after another thread's stack was mapped there. Now such a fiber's stack is
//! leaked. Safe code only: no `unsafe` in this file.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use mpkvirt_host::sched::green::{Fiber, Resumed};

#[test]
#[ignore = "child of a_scoped_threads_borrow_of_a_dropped_fibers_stack_stays_valid"]
fn scoped_child() {
    // (The parent waits for the scoped thread to finish, not for a fixed time: it may run
    // slowly on a loaded machine.)
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut f = Fiber::new(64 << 10, move |s| {
        let local = std::hint::black_box([7u64; 64]); // on the fiber's stack
        let local = &local; // the thread borrows it (not a copy)
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(move || {
                for i in 0..3_000 {
                    let sum: u64 = std::hint::black_box(local).iter().sum();
                    if i == 0 {
                        println!("scoped thread reads {:p}: sum {sum}", local);
                        tx.send(()).unwrap();
                    }
                    if sum != 7 * 64 {
                        println!(
                            "scoped thread, iteration {i}: the fiber's local now sums to {sum}"
                        );
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                println!("scoped thread done");
                let _ = done_tx.send(());
            });
            rx.recv().unwrap(); // the thread runs and reads `local`
            s.suspend(); // suspended inside the scope, its thread still running
        });
    })
    .unwrap();
    assert!(matches!(f.resume(), Resumed::Suspended));
    drop(f); // the scope's join never runs: `local` must stay where it is
    println!("fiber dropped");
    // Whatever is mapped next may land there (here: another stack).
    let _g = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(4)));
    // (A scoped thread that saw the stack change returns without sending: the timeout.)
    let _ = done_rx.recv_timeout(Duration::from_secs(120));
    println!("parent survived");
}

#[test]
fn a_scoped_threads_borrow_of_a_dropped_fibers_stack_stays_valid() {
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "scoped_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("scoped thread done"),
        "a scoped thread's borrow of the fiber's stack outlived the stack (safe code): {:?}\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}
