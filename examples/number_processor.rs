//! The original module's first example, in Rust: `init` seeds 50 random numbers,
//! `run` says whether each is even or odd, and more numbers are buffered later,
//! some with front priority.
//!
//! `cargo run --example number_processor`

use buffered_task::{Builder, Handle, Outcome, Priority, Sink, Task};
use rand::Rng;
use std::time::Duration;

struct NumberProcessor;

struct Settings {
    initial_count: usize,
}

impl Task for NumberProcessor {
    type Entry = u32;
    type State = Settings;

    fn init(&self, sink: &mut Sink<u32>, state: &Settings) {
        let mut rng = rand::thread_rng();
        sink.extend((0..state.initial_count).map(|_| rng.gen_range(1..=1000)));
    }

    fn run(&self, numbers: &[u32], _: &Settings) -> Outcome<u32, Settings> {
        for n in numbers {
            let parity = if n % 2 == 0 { "even" } else { "odd" };
            println!("Number {n} is {parity}");
        }
        Outcome::Ok
    }
}

fn add_numbers(handle: &Handle<u32>, count: usize, priority: Priority) {
    let mut rng = rand::thread_rng();
    let numbers = (0..count).map(|_| rng.gen_range(1..=1000)).collect();
    handle
        .buffer(numbers, priority)
        .expect("the engine is running");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handle = Builder::new(NumberProcessor, Settings { initial_count: 50 })
        .name("number-processor")
        .poll(false)
        .flush_interval(Duration::from_millis(500))
        .max_batch_size(10)
        .max_concurrency(2)
        .start()?;

    add_numbers(&handle, 20, Priority::Back); // normal priority
    add_numbers(&handle, 5, Priority::Front); // ahead of what is queued

    let report = handle.shutdown_drain()?;
    println!(
        "done; {} entries left unprocessed",
        report.unprocessed.len()
    );
    Ok(())
}
