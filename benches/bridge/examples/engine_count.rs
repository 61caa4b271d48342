//! The engine path run a given number of times, for instruction counts: wall-clock
//! microbenchmarks swing by tens of percent on a shared 2-core VM, callgrind's instruction
//! counts do not (same binary, same input: same count). `count.sh` runs this under
//! `valgrind --tool=callgrind` at two repetition counts and divides the difference, so set-up
//! (flow loading, script compilation) cancels out.
//!
//!   engine_count <script|all> <N>
//!
//! `script`: `Script::run` of the enrich script on one received message (criterion's step 3);
//! `all`: parse + trees + dispatch through the Compute node + serialise (criterion's `all`).

#[path = "../benches/fixture/mod.rs"]
mod fixture;

use std::hint::black_box;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (what, n) = match args.as_slice() {
        [_, w, n] => (w.as_str(), n.parse::<u64>().unwrap_or(0)),
        _ => {
            eprintln!("usage: engine_count <script|all> <N>");
            std::process::exit(2)
        }
    };
    let p = fixture::payload();
    let script = fixture::enrich_script();
    match what {
        "script" => {
            let msg = fixture::receive(&p);
            for _ in 0..n {
                black_box(script.run(&msg, &["Out"]).expect("script"));
            }
        }
        "all" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let flow = fixture::bridge_flow();
            let ctx = flow.input_ctx("in").expect("input node");
            let out = script
                .run(&fixture::receive(&p), &["Out"])
                .expect("script")
                .message;
            for _ in 0..n {
                let msg = fixture::receive(&p);
                rt.block_on(ctx.dispatch(msg));
                black_box(out.root.body.to_bytes());
            }
        }
        other => {
            eprintln!("engine_count: unknown step {other} (script or all)");
            std::process::exit(2)
        }
    }
}
