//! The runtime end to end: built-in and native functions run in their instances' sandboxes,
//! and every misbehaviour of a tenant ends only its own invocation.
//!
//! One scenario, run natively (emulated backend: one worker, tenant code serialized) and in
//! the PKU guest (`pku_*`: hardware keys, two workers), with more applications than keys and
//! invocations from several client threads at once. The hostile tenant
//! (`host/tenants/c/hostile.c`) dereferences null, aborts, divides by zero, executes an
//! illegal instruction, overflows its stack, loops forever, exhausts its memory quota, reads
//! and writes another tenant's instance, passes wild pointers to host calls, and calls
//! mpkvirt's gate with a forged op; after each, the host keeps serving.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mpkvirt_host::app::native::NativeFunction;
use mpkvirt_host::runtime::{App, Arrangement, Code, Host, HostConfig, InvokeError, Limits};
use mpkvirt_sys::require_pku;

fn native(name: &str) -> Code {
    // SAFETY: the project's own tenants; loading runs no code of theirs (no constructors).
    #[allow(unsafe_code, reason = "loading the project's own tenants")]
    let f = unsafe { NativeFunction::load(&common::build_c(name)) }.unwrap();
    Code::Native(Arc::new(f))
}

fn app(name: &str, code: Code, limits: Limits) -> App {
    App {
        name: name.into(),
        code,
        limits,
    }
}

fn with_arg(op: u8, arg: u64) -> Vec<u8> {
    let mut v = vec![op];
    v.extend_from_slice(&arg.to_le_bytes());
    v
}

/// `Host::invoke`, failing the test after 20 s without an answer: the whole process exits,
/// since a host whose worker hangs would also hang dropping it.
fn within(host: &Host, name: &str, req: &[u8]) -> Result<Vec<u8>, InvokeError> {
    let (tx, rx) = std::sync::mpsc::channel();
    host.submit(name, req.to_vec(), move |out| {
        let _ = tx.send(out);
    })?;
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| {
            eprintln!(
                "{name} {:?}: no answer in 20 s: the host hangs",
                req[0] as char
            );
            std::process::exit(101)
        })
}

fn fault(signal: i32) -> Result<Vec<u8>, InvokeError> {
    Err(InvokeError::Fault { signal })
}

/// Key-0 memory of the host process (a static of its binary) for the tenant to write.
static KEY0_STATIC: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(7);

fn scenario(workers: usize) {
    let host = Host::start(HostConfig {
        workers: Some(workers),
        slot_size: 1 << 20,
        slots: 128,
        stack_size: 64 << 10,
        ..HostConfig::default()
    })
    .unwrap();
    let parallel = matches!(host.arrangement(), Arrangement::Parallel { .. });
    eprintln!("arrangement: {}", host.arrangement());
    let limits = Limits {
        timeout: Duration::from_millis(300),
        memory: 64 << 10,
        concurrency: 16,
    };
    host.register(app(
        "echo-rs",
        Code::Builtin(Arc::new(|req: &[u8]| Ok(req.to_vec()))),
        limits,
    ));
    host.register(app(
        "panic-rs",
        Code::Builtin(Arc::new(|_: &[u8]| panic!("a built-in's bug"))),
        limits,
    ));
    host.register(app(
        "fail-rs",
        Code::Builtin(Arc::new(|_: &[u8]| Err("bad input".into()))),
        limits,
    ));
    let hostile = native("hostile");
    let hostile_code = hostile.clone();
    let workers = host.arrangement().workers();
    host.register(app("hostile", hostile.clone(), limits));
    host.register(app("hostile-2", hostile.clone(), limits));
    host.register(app("echo-c", native("echo"), limits));
    host.register(app("sha256", native("sha256"), limits));
    host.register(app("echo-rust", native("echo_rs"), limits));
    host.register(app("deflate", native("deflate_rs"), limits));
    host.register(app("words", native("words"), limits));
    // More applications than keys.
    for i in 0..20 {
        host.register(app(&format!("echo-{i}"), native("echo"), limits));
    }

    assert_eq!(host.invoke("echo-rs", b"hello").unwrap(), b"hello");
    assert_eq!(host.invoke("echo-c", b"hello").unwrap(), b"hello");
    // The Rust tenants: an echo, and DEFLATE both ways, in their sandboxes.
    assert_eq!(host.invoke("echo-rust", b"hello").unwrap(), b"hello");
    let text: Vec<u8> = (0..2000)
        .flat_map(|i| format!("{} ", i % 17).into_bytes())
        .collect();
    let mut req = vec![b'c'];
    req.extend_from_slice(&text);
    let packed = host.invoke("deflate", &req).unwrap();
    assert!(packed.len() < text.len() / 4);
    let mut req = vec![b'd'];
    req.extend_from_slice(&packed);
    assert_eq!(host.invoke("deflate", &req).unwrap(), text);
    // (The tenant answers in hex.)
    assert_eq!(
        String::from_utf8(host.invoke("sha256", b"abc").unwrap()).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        host.invoke("nope", b""),
        Err(InvokeError::UnknownFunction("nope".into()))
    );
    assert_eq!(host.invoke("panic-rs", b""), Err(InvokeError::Panicked));
    assert!(matches!(
        host.invoke("fail-rs", b""),
        Err(InvokeError::Failed { code: 1, ref message }) if message == "bad input"
    ));

    // Each misbehaviour ends its invocation; the host keeps serving.
    let alive =
        |host: &Host| assert_eq!(host.invoke("echo-c", b"still here").unwrap(), b"still here");
    for (req, want) in [
        (&b"n"[..], fault(libc::SIGSEGV)),
        (b"a", fault(libc::SIGABRT)),
        // A smashed canary: the compiler's check calls `__stack_chk_fail`.
        (b"S", fault(libc::SIGABRT)),
        // A checked copy that does not fit (fortification's `__memcpy_chk`).
        (b"F", fault(libc::SIGABRT)),
        // Its own static data, which every instance shares: read-only.
        (b"D", fault(libc::SIGSEGV)),
        (b"d", fault(libc::SIGFPE)),
        (b"i", fault(libc::SIGILL)),
        (b"s", fault(libc::SIGSEGV)),
        (b"l", Err(InvokeError::Deadline)),
        (
            b"h",
            Err(InvokeError::BadHostCall("a log line outside the instance")),
        ),
        (
            b"f",
            Err(InvokeError::BadHostCall(
                "free of memory the host did not allocate",
            )),
        ),
    ] {
        eprintln!("hostile {:?}", req[0] as char);
        let got = host.invoke("hostile", req);
        assert_eq!(got, want, "request {:?}", req[0] as char);
        alive(&host);
    }
    eprintln!("quota");
    // The quota: 4 KiB blocks until refused, within 64 KiB.
    let n = u64::from_le_bytes(host.invoke("hostile", b"m").unwrap().try_into().unwrap());
    assert!(
        (8..16).contains(&n),
        "{n} blocks of 4 KiB in a 64 KiB quota"
    );

    // The same through the C allocator: the loader bound the tenant's malloc to a heap in
    // its instance, within the same quota.
    let n = u64::from_le_bytes(host.invoke("hostile", b"M").unwrap().try_into().unwrap());
    assert!(
        (1..16).contains(&n),
        "{n} mallocs of 4 KiB in a 64 KiB quota"
    );
    alive(&host);
    // A tenant using malloc, calloc, realloc and free freely.
    assert_eq!(
        host.invoke("words", b"the cat and the hat; The END and the end")
            .unwrap(),
        b"the 4\nand 2\nend 2\ncat 1\nhat 1\n"
    );

    // A built-in invoked by a native function whose deadline passes while the built-in
    // allocates: the built-in is the host's code and runs to its end (abandoned inside the
    // heap's lock, it would leave every thread of the host waiting for it); the caller's
    // deadline is reported after.
    host.register(app(
        "alloc-long",
        Code::Builtin(Arc::new(|_: &[u8]| {
            // Mostly inside the allocator (and its lock), where an abandonment would land.
            let until = std::time::Instant::now() + Duration::from_millis(400);
            while std::time::Instant::now() < until {
                for i in 0..1000u64 {
                    drop(std::hint::black_box(Box::new(i)));
                }
            }
            Ok(b"done".to_vec())
        })),
        limits,
    ));
    for _ in 0..3 {
        assert_eq!(
            within(&host, "hostile", b"Ialloc-long"),
            Err(InvokeError::Deadline)
        );
        alive(&host);
    }

    eprintln!("other instance");
    // Nested invocations (of a native function): the answer comes back; a caller that loops
    // after one still ends at its deadline (the nested step must not clear its caller's
    // preemption mark). On one worker the nested step must not wait for the lock its caller
    // holds.
    assert_eq!(within(&host, "hostile", b"v").unwrap(), b"nested");
    assert_eq!(within(&host, "hostile", b"V"), Err(InvokeError::Deadline));
    alive(&host);

    // A name registered again is a new application: neither it nor one registered after it
    // gets the instances the name's earlier application left warm, nor each other's.
    host.register(app("again", hostile.clone(), limits));
    host.register(app("again", hostile.clone(), limits));
    host.register(app("after-again", hostile.clone(), limits));
    let at_again = u64::from_le_bytes(host.invoke("again", b"p").unwrap().try_into().unwrap());
    assert_eq!(
        host.invoke("after-again", &with_arg(b'r', at_again)),
        fault(libc::SIGSEGV)
    );
    assert_eq!(
        host.invoke("again", &with_arg(b'r', at_again)).unwrap(),
        b"S"
    );

    // Built-in functions that spend a long time in the global allocator, while others run:
    // none is preempted inside it (the worker allocates too).
    host.register(app(
        "alloc-rs",
        Code::Builtin(Arc::new(|_: &[u8]| {
            let until = std::time::Instant::now() + Duration::from_millis(20);
            let mut kept = Vec::new();
            while std::time::Instant::now() < until {
                kept.push(vec![1u8; 1000]);
                if kept.len() > 64 {
                    kept.clear();
                }
            }
            Ok(b"done".to_vec())
        })),
        limits,
    ));
    std::thread::scope(|s| {
        for t in 0..3 {
            let host = &host;
            s.spawn(move || {
                for k in 0..5 {
                    assert_eq!(host.invoke("alloc-rs", b"").unwrap(), b"done");
                    let body = format!("{t}/{k}");
                    assert_eq!(
                        host.invoke("echo-rs", body.as_bytes()).unwrap(),
                        body.as_bytes()
                    );
                }
            });
        }
    });

    // Another tenant's instance: its memory faults; its own (warm) instance does not.
    let at = u64::from_le_bytes(host.invoke("hostile", b"p").unwrap().try_into().unwrap());
    assert_eq!(
        host.invoke("hostile-2", &with_arg(b'r', at)),
        fault(libc::SIGSEGV)
    );
    assert_eq!(
        host.invoke("hostile-2", &with_arg(b'w', at)),
        fault(libc::SIGSEGV)
    );
    assert_eq!(host.invoke("hostile", &with_arg(b'r', at)).unwrap(), b"S");
    alive(&host);
    // Memory from the tenant's malloc is its instance's too: not the host's heap, and (where
    // rights are per thread) out of another tenant's reach — the C library's heap would be
    // key-0 memory, readable by every tenant.
    let at = u64::from_le_bytes(host.invoke("hostile", b"P").unwrap().try_into().unwrap());
    assert!(!mpkvirt_host::heap::contains(at as usize));
    if parallel {
        assert_eq!(
            host.invoke("hostile-2", &with_arg(b'r', at)),
            fault(libc::SIGSEGV)
        );
    }
    alive(&host);

    // The host's heap is the host domain: a tenant reaches it only where rights are
    // process-wide page protections (emulated; said at start), never on PKU.
    let secret = Box::new([b'H'; 64]);
    let at = &raw const *secret as u64;
    assert!(
        mpkvirt_host::heap::contains(at as usize),
        "a host box at {at:#x}"
    );
    if parallel {
        assert_eq!(
            host.invoke("hostile", &with_arg(b'r', at)),
            fault(libc::SIGSEGV)
        );
        assert_eq!(
            host.invoke("hostile", &with_arg(b'w', at)),
            fault(libc::SIGSEGV)
        );
    }
    assert_eq!(*secret, [b'H'; 64]);
    alive(&host);

    // Key-0 memory: a static of the host binary and the stack of the thread that invokes.
    // Where the kernel writes signal frames with every key open (Linux 6.12 on), a sandbox's
    // key 0 is read-only and both writes fault; elsewhere (the 6.1 kernel, or emulated
    // protection) they go through — the documented limit.
    let mut local = 7u8;
    for at in [KEY0_STATIC.as_ptr() as u64, (&raw mut local) as u64] {
        let got = host.invoke("hostile", &with_arg(b'w', at));
        if mpkvirt::sandbox::seals_key0() {
            assert_eq!(got, fault(libc::SIGSEGV), "a write at {at:#x} (key 0)");
        } else {
            assert_eq!(got.unwrap(), b"w");
        }
    }
    let written = if mpkvirt::sandbox::seals_key0() {
        7
    } else {
        b'X'
    };
    assert_eq!(
        KEY0_STATIC.load(std::sync::atomic::Ordering::Relaxed),
        written
    );
    // SAFETY: a local of this thread; the tenant's write (if any) finished.
    assert_eq!(unsafe { (&raw const local).read_volatile() }, written);
    KEY0_STATIC.store(7, std::sync::atomic::Ordering::Relaxed);
    alive(&host);

    eprintln!("forged op");
    // A forged op through mpkvirt's gate is refused.
    let gate = if parallel {
        mpkvirt_asm::mpkvirt_gate_call as *const () as u64
    } else {
        mpkvirt_asm::mpkvirt_gate_call_nopku as *const () as u64
    };
    let status = host.invoke("hostile", &with_arg(b'g', gate)).unwrap();
    let status = u64::from_le_bytes(status.try_into().unwrap());
    assert_ne!(status & (1 << 63), 0, "the forged op returned {status:#x}");
    alive(&host);

    eprintln!("clients");
    // Many clients at once, well-behaved and hostile interleaved, over more apps than keys.
    std::thread::scope(|s| {
        for t in 0..4 {
            let host = &host;
            s.spawn(move || {
                for k in 0..40 {
                    let name = format!("echo-{}", (t * 7 + k) % 20);
                    let body = format!("{t}-{k}");
                    assert_eq!(
                        host.invoke(&name, body.as_bytes()).unwrap(),
                        body.as_bytes()
                    );
                    if k % 10 == t {
                        assert_eq!(host.invoke("hostile", b"n"), fault(libc::SIGSEGV));
                    }
                }
            });
        }
    });

    eprintln!("limit");
    // The concurrency limit.
    host.register(app(
        "single",
        hostile.clone(),
        Limits {
            concurrency: 1,
            ..limits
        },
    ));
    std::thread::scope(|s| {
        let looping = s.spawn(|| host.invoke("single", b"l"));
        while host.in_flight("single") == 0 {
            std::thread::yield_now();
        }
        assert_eq!(
            host.invoke("single", b"e"),
            Err(InvokeError::Overloaded { limit: 1 })
        );
        assert_eq!(looping.join().unwrap(), Err(InvokeError::Deadline));
    });
    alive(&host);

    // Preemption: functions that loop until their deadline, one per worker, do not hold up
    // short ones (without preemption, these would wait the full two seconds).
    host.register(app(
        "long",
        hostile_code.clone(),
        Limits {
            timeout: Duration::from_secs(2),
            ..limits
        },
    ));
    std::thread::scope(|s| {
        let longs: Vec<_> = (0..workers)
            .map(|_| s.spawn(|| host.invoke("long", b"L")))
            .collect();
        while host.logs().iter().filter(|l| *l == "long: looping").count() < workers {
            assert!(
                !longs.iter().any(|l| l.is_finished()),
                "a long function ended early"
            );
            std::thread::yield_now();
        }
        for i in 0..20 {
            let body = format!("short {i}");
            assert_eq!(
                host.invoke("echo-rs", body.as_bytes()).unwrap(),
                body.as_bytes()
            );
        }
        assert_eq!(
            host.in_flight("long"),
            workers,
            "the short functions waited for the long ones to end"
        );
        for l in longs {
            assert_eq!(l.join().unwrap(), Err(InvokeError::Deadline));
        }
    });
}

#[test]
fn the_runtime_contains_every_misbehaviour() {
    scenario(2);
}

#[test]
fn pku_the_runtime_contains_every_misbehaviour_on_two_workers() {
    let _pku = require_pku!();
    scenario(2);
}

/// Dropping a host while a native function loops: the workers finish what they hold, and the
/// watchdog keeps preempting them until they have (the function ends at its deadline), so the
/// drop returns.
#[test]
fn dropping_a_host_with_a_looping_function_returns() {
    let host = Host::start(HostConfig {
        workers: Some(1),
        ..HostConfig::default()
    })
    .unwrap();
    host.register(app(
        "loop",
        native("hostile"),
        Limits {
            timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    host.submit("loop", b"L".to_vec(), move |r| {
        let _ = tx.send(r);
    })
    .unwrap();
    while !host.logs().iter().any(|l| l == "loop: looping") {
        std::thread::yield_now();
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(host);
        let _ = done_tx.send(());
    });
    if done_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        eprintln!("the host's drop did not return in 20 s");
        std::process::exit(101);
    }
    assert_eq!(rx.recv().unwrap(), Err(InvokeError::Deadline));
}
