//! A block indexer as a service would write one: blocks fetched from a JSON-RPC
//! node with batched `eth_getBlockByNumber` requests, decoded, and written to
//! PostgreSQL when `DATABASE_URL` is set (a plain table, `indexer_blocks`, upserted
//! so a retried batch never writes a block twice), as JSON lines on stdout
//! otherwise.
//!
//! The node is simulated by a small HTTP server on a local port (a thread per
//! connection, std `TcpListener`): each request takes 1–4 ms, about 1 in 50 fails
//! outright with HTTP 503, and about 1 block in 30 answers "header not found". The
//! engine retries what failed with a backoff (`RetryPolicy`), so every block ends
//! up indexed. `init` streams the blocks the table does not hold yet, so a second
//! run picks up where the first stopped.
//!
//! ```sh
//! cargo run --release -p buffered-task-pg --example indexer              # stdout
//! DATABASE_URL="host=127.0.0.1 user=postgres dbname=test" \
//!   cargo run --release -p buffered-task-pg --example indexer -- --reset # PostgreSQL
//! ```
//!
//! `INDEXER_BLOCKS` sets how many blocks (default 5000); `--reset` empties the
//! table first. The example checks its own result before it exits: every block
//! present once, each one's parent hash equal to the previous block's hash.

use buffered_task::{Builder, Outcome, RetryPolicy, RunError, Sink, Task};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error + Send + Sync>;

// ---- the simulated node -------------------------------------------------------

/// A deterministic 64-bit mix (splitmix64): block hashes, latencies, failures.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn block_hash(number: u64) -> String {
    format!("0x{:016x}{:016x}", mix(number), mix(!number))
}

/// The node's answer for one block: the block, or an error now and then.
fn block_json(number: u64, request: u64) -> Value {
    if mix(number ^ request.rotate_left(17)).is_multiple_of(30) {
        return json!({"code": -32000, "message": "header not found"});
    }
    let txs: Vec<String> = (0..mix(number) % 8)
        .map(|i| format!("0x{:016x}", mix(number * 1000 + i)))
        .collect();
    json!({
        "number": format!("0x{number:x}"),
        "hash": block_hash(number),
        "parentHash": block_hash(number.wrapping_sub(1)),
        "timestamp": format!("0x{:x}", 1_600_000_000 + 12 * number),
        "gasUsed": format!("0x{:x}", mix(number) % 30_000_000),
        "transactions": txs,
    })
}

/// Answers one JSON-RPC request body (a single call or a batch).
fn answer(body: &[u8], request: u64) -> Value {
    let calls = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(calls)) => calls,
        Ok(call) => vec![call],
        Err(_) => return json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700}}),
    };
    let replies = calls.iter().map(|call| {
        let number = call["params"][0]
            .as_str()
            .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok());
        match number {
            Some(number) => match block_json(number, request) {
                block if block.get("code").is_some() => {
                    json!({"jsonrpc": "2.0", "id": call["id"], "error": block})
                }
                block => json!({"jsonrpc": "2.0", "id": call["id"], "result": block}),
            },
            None => json!({"jsonrpc": "2.0", "id": call["id"], "error": {"code": -32602}}),
        }
    });
    Value::Array(replies.collect())
}

/// Serves HTTP/1.1 keep-alive requests on one connection until the client closes
/// it or the node stops.
fn serve(stream: TcpStream, stop: &AtomicBool, requests: &AtomicU64) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()), // closed
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let request = requests.fetch_add(1, Ordering::Relaxed);
        // The node's latency, 1–4 ms, and now and then an overloaded node.
        std::thread::sleep(Duration::from_micros(1_000 + mix(request) % 3_000));
        let (status, reply) = if mix(!request).is_multiple_of(50) {
            ("503 Service Unavailable", String::from("overloaded"))
        } else {
            ("200 OK", answer(&body, request).to_string())
        };
        // One write per response (several small ones would meet Nagle's delay).
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        writer.write_all(response.as_bytes())?;
    }
}

/// The simulated node: an accept thread and a thread per connection, all joined
/// by [`Node::stop`].
struct Node {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
}

impl Node {
    fn start() -> std::io::Result<Node> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let requests = Arc::new(AtomicU64::new(0));
                let mut connections = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (stop, requests) = (stop.clone(), requests.clone());
                    connections.push(std::thread::spawn(move || {
                        if let Err(e) = serve(stream, &stop, &requests) {
                            log::debug!("node: connection ended: {e}");
                        }
                    }));
                }
                for connection in connections {
                    let _ = connection.join();
                }
            }
        });
        Ok(Node {
            addr,
            stop,
            acceptor,
        })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wakes the accept call
        let _ = self.acceptor.join();
    }
}

// ---- the indexer --------------------------------------------------------------

/// A decoded block, as it is stored.
#[derive(Debug)]
struct Block {
    number: i64,
    hash: String,
    parent_hash: String,
    timestamp: i64,
    gas_used: i64,
    tx_count: i32,
}

fn hex(value: &Value, field: &str) -> Result<i64, Error> {
    let text = value[field].as_str().ok_or_else(|| format!("no {field}"))?;
    Ok(i64::from_str_radix(text.trim_start_matches("0x"), 16)?)
}

fn decode(result: &Value) -> Result<Block, Error> {
    let text = |field: &str| -> Result<String, Error> {
        Ok(result[field]
            .as_str()
            .ok_or_else(|| format!("no {field}"))?
            .to_string())
    };
    Ok(Block {
        number: hex(result, "number")?,
        hash: text("hash")?,
        parent_hash: text("parentHash")?,
        timestamp: hex(result, "timestamp")?,
        gas_used: hex(result, "gasUsed")?,
        tx_count: result["transactions"].as_array().map_or(0, Vec::len) as i32,
    })
}

/// Where decoded blocks go.
enum Store {
    /// JSON lines on stdout; what was written is kept for the final check.
    Stdout {
        written: Mutex<Vec<(i64, String, String)>>,
    },
    /// Idle connections; a worker takes one (or opens one) for each batch.
    Postgres {
        url: String,
        idle: Mutex<Vec<postgres::Client>>,
    },
}

const UPSERT: &str = "INSERT INTO indexer_blocks
       (number, hash, parent_hash, timestamp, gas_used, tx_count)
     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                          $6::int[])
     ON CONFLICT (number) DO UPDATE SET hash = EXCLUDED.hash,
       parent_hash = EXCLUDED.parent_hash, timestamp = EXCLUDED.timestamp,
       gas_used = EXCLUDED.gas_used, tx_count = EXCLUDED.tx_count";

/// Rows below `$1`, distinct numbers, and blocks whose parent hash is not the
/// previous block's hash.
const CHECK: &str = "SELECT count(*), count(DISTINCT number),
       count(*) FILTER (WHERE parent_hash <> previous)
     FROM (SELECT number, parent_hash, lag(hash) OVER (ORDER BY number) AS previous
           FROM indexer_blocks WHERE number < $1) AS chain";

impl Store {
    fn open(url: Option<String>, reset: bool) -> Result<Store, Error> {
        let Some(url) = url else {
            return Ok(Store::Stdout {
                written: Mutex::new(Vec::new()),
            });
        };
        let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
        client.batch_execute(
            "CREATE TABLE IF NOT EXISTS indexer_blocks (
                number bigint PRIMARY KEY, hash text NOT NULL, parent_hash text NOT NULL,
                timestamp bigint NOT NULL, gas_used bigint NOT NULL, tx_count int NOT NULL)",
        )?;
        if reset {
            client.batch_execute("TRUNCATE indexer_blocks")?;
        }
        let idle = Mutex::new(vec![client]);
        Ok(Store::Postgres { url, idle })
    }

    /// A connection for one call: an idle one, or a new one. It goes back only
    /// after a call that worked (after an error it may be broken).
    fn with_client<R>(
        url: &str,
        idle: &Mutex<Vec<postgres::Client>>,
        call: impl FnOnce(&mut postgres::Client) -> Result<R, postgres::Error>,
    ) -> Result<R, Error> {
        let taken = idle.lock().pop(); // the lock is released here
        let mut client = match taken {
            Some(client) => client,
            None => postgres::Client::connect(url, postgres::NoTls)?,
        };
        let result = call(&mut client)?;
        idle.lock().push(client);
        Ok(result)
    }

    /// The block numbers below `blocks` not stored yet.
    fn missing(&self, blocks: u64) -> Result<Vec<u64>, Error> {
        match self {
            Store::Stdout { .. } => Ok((0..blocks).collect()),
            Store::Postgres { url, idle } => {
                let rows = Self::with_client(url, idle, |c| {
                    c.query(
                        "SELECT n FROM generate_series(0, $1::bigint - 1) AS n
                         WHERE NOT EXISTS (SELECT 1 FROM indexer_blocks WHERE number = n)
                         ORDER BY n",
                        &[&(blocks as i64)],
                    )
                })?;
                Ok(rows.iter().map(|row| row.get::<_, i64>(0) as u64).collect())
            }
        }
    }

    fn write(&self, blocks: &[Block]) -> Result<(), Error> {
        match self {
            Store::Stdout { written } => {
                let mut out = std::io::stdout().lock();
                for b in blocks {
                    let line = json!({"number": b.number, "hash": b.hash,
                        "parent": b.parent_hash, "timestamp": b.timestamp,
                        "gas_used": b.gas_used, "txs": b.tx_count});
                    writeln!(out, "{line}")?;
                }
                drop(out);
                let rows = blocks
                    .iter()
                    .map(|b| (b.number, b.hash.clone(), b.parent_hash.clone()));
                written.lock().extend(rows);
                Ok(())
            }
            Store::Postgres { url, idle } => {
                let number: Vec<i64> = blocks.iter().map(|b| b.number).collect();
                let hash: Vec<&str> = blocks.iter().map(|b| b.hash.as_str()).collect();
                let parent: Vec<&str> = blocks.iter().map(|b| b.parent_hash.as_str()).collect();
                let timestamp: Vec<i64> = blocks.iter().map(|b| b.timestamp).collect();
                let gas: Vec<i64> = blocks.iter().map(|b| b.gas_used).collect();
                let txs: Vec<i32> = blocks.iter().map(|b| b.tx_count).collect();
                Self::with_client(url, idle, |c| {
                    c.execute(UPSERT, &[&number, &hash, &parent, &timestamp, &gas, &txs])
                })?;
                Ok(())
            }
        }
    }

    /// (blocks stored below `blocks`, distinct numbers, broken parent links).
    fn check(&self, blocks: u64) -> Result<(i64, i64, i64), Error> {
        match self {
            Store::Stdout { written } => {
                let mut rows = written.lock().clone();
                rows.sort();
                let distinct = rows.windows(2).filter(|w| w[0].0 != w[1].0).count() + 1;
                let broken = rows.windows(2).filter(|w| w[1].2 != w[0].1).count();
                let n = rows.len() as i64;
                Ok((
                    n,
                    if rows.is_empty() { 0 } else { distinct as i64 },
                    broken as i64,
                ))
            }
            Store::Postgres { url, idle } => {
                let row =
                    Self::with_client(url, idle, |c| c.query_one(CHECK, &[&(blocks as i64)]))?;
                Ok((row.get(0), row.get(1), row.get(2)))
            }
        }
    }
}

struct Indexer {
    rpc: ureq::Agent,
    url: String,
    store: Arc<Store>,
    /// How many blocks the chain has (`init` streams those not stored yet).
    blocks: u64,
}

impl Indexer {
    /// One batched JSON-RPC call: the decoded blocks and the numbers that failed.
    fn fetch(&self, numbers: &[u64]) -> Result<(Vec<Block>, Vec<u64>), Error> {
        let calls: Vec<Value> = numbers
            .iter()
            .map(|n| {
                json!({"jsonrpc": "2.0", "id": n, "method": "eth_getBlockByNumber",
                       "params": [format!("0x{n:x}"), false]})
            })
            .collect();
        let reply = self
            .rpc
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(&Value::Array(calls).to_string())?
            .body_mut()
            .read_to_string()?;
        let replies: Vec<Value> = serde_json::from_str(&reply)?;
        let mut blocks = Vec::with_capacity(numbers.len());
        for reply in &replies {
            if reply.get("error").is_none() {
                blocks.push(decode(&reply["result"])?);
            }
        }
        // A block without a good reply, for whatever reason, is tried again.
        let done: HashSet<i64> = blocks.iter().map(|b| b.number).collect();
        let failed = numbers
            .iter()
            .copied()
            .filter(|n| !done.contains(&(*n as i64)));
        Ok((blocks, failed.collect()))
    }
}

impl Task for Indexer {
    type Entry = u64;
    type State = ();

    fn init(&self, sink: &mut Sink<u64>, _: &()) {
        match self.store.missing(self.blocks) {
            Ok(missing) => {
                log::info!("indexer: {} blocks to fetch", missing.len());
                sink.extend(missing);
            }
            Err(e) => log::error!("indexer: cannot list the missing blocks: {e}"),
        }
    }

    fn run(&self, numbers: &[u64], _: &()) -> Outcome<u64, ()> {
        let (blocks, failed) = match self.fetch(numbers) {
            Ok(fetched) => fetched,
            Err(e) => return Outcome::fail(format!("fetching {} blocks: {e}", numbers.len())),
        };
        if let Err(e) = self.store.write(&blocks) {
            return Outcome::fail(format!("writing {} blocks: {e}", blocks.len()));
        }
        if failed.is_empty() {
            Outcome::Ok
        } else {
            let error = RunError::new(format!("header not found for {} blocks", failed.len()));
            Outcome::FailEntries(failed, error)
        }
    }
}

fn main() -> Result<(), Error> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let blocks: u64 = match std::env::var("INDEXER_BLOCKS") {
        Ok(n) => n.parse()?,
        Err(_) => 5_000,
    };
    let reset = std::env::args().any(|a| a == "--reset");
    let url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    let target = if url.is_some() {
        "PostgreSQL (table indexer_blocks)"
    } else {
        "stdout"
    };
    let store = Arc::new(Store::open(url, reset)?);
    let node = Node::start()?;
    log::info!(
        "indexer: node at http://{}, {blocks} blocks, writing to {target}",
        node.addr
    );

    let start = Instant::now();
    let rpc: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let indexer = Indexer {
        rpc,
        url: format!("http://{}/", node.addr),
        store: store.clone(),
        blocks,
    };
    let handle = Builder::new(indexer, ())
        .name("indexer")
        .max_batch_size(50) // blocks per JSON-RPC batch
        .max_concurrency(4) // requests in flight
        .poll(false)
        .retry_policy(
            RetryPolicy::new(8).backoff(Duration::from_millis(10), Duration::from_millis(500)),
        )
        .dead_letter_handler(|numbers, reason| {
            log::error!("indexer: gave up on {} blocks: {reason}", numbers.len())
        })
        .start()?;
    // Runs everything `init` streams, with every retry, then stops.
    let report = handle.shutdown_drain()?;
    let took = start.elapsed();
    node.stop();

    let stats = handle.stats();
    let (stored, distinct, broken) = store.check(blocks)?;
    log::info!(
        "indexer: {} blocks in {took:.2?} ({:.0}/s); {} retried, {} dead-lettered, {} left",
        stats.processed,
        stats.processed as f64 / took.as_secs_f64(),
        stats.retried,
        stats.dead_lettered,
        report.unprocessed.len()
    );
    log::info!("indexer: check: {stored} rows, {distinct} distinct, {broken} broken links");
    if stored != blocks as i64 || distinct != stored || broken != 0 {
        return Err(
            format!("check failed: {stored} rows, {distinct} distinct, {broken} broken").into(),
        );
    }
    Ok(())
}
