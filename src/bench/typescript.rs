//! `scriptd bench typescript`: how long the one-time TypeScript compile takes at deploy,
//! for a small and a large handler (min / median / max over repeated compiles).

use std::time::{Duration, Instant};

use clap::Args;

use crate::scripts::typescript::{compile, Lang};

#[derive(Debug, Args)]
pub struct TypeScriptBenchArgs {
    /// Compiles of each size.
    #[arg(long, default_value_t = 50)]
    pub rounds: usize,
}

/// A TypeScript handler of about `bytes` bytes: interfaces, an enum, typed helpers.
fn handler_of(bytes: usize) -> String {
    let mut source = String::from(
        "import type { Handler } from \"scriptd\";\n\
         enum Status { Open = \"open\", Paid = \"paid\" }\n\
         interface Line { sku: string; price: number; qty: number }\n",
    );
    let mut i = 0;
    while source.len() < bytes {
        source.push_str(&format!(
            "function total{i}(lines: Line[], rate: number = 1): number {{\n  \
             return lines.reduce((sum: number, l: Line) => sum + l.price * l.qty * rate, 0);\n}}\n"
        ));
        i += 1;
    }
    source.push_str(
        "const handler: Handler = (event) => ({ status: Status.Open, total: total0([], 1) });\n\
         export default handler;\n",
    );
    source
}

fn stats(mut times: Vec<Duration>) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:.2} ms, median {:.2} ms, max {:.2} ms",
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    )
}

pub fn typescript(args: TypeScriptBenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let rounds = args.rounds.max(1);
    for (label, bytes) in [("1 KiB", 1024), ("100 KiB", 100 * 1024)] {
        let source = handler_of(bytes);
        let mut times = Vec::with_capacity(rounds);
        let mut output = 0;
        for _ in 0..rounds {
            let start = Instant::now();
            let compiled = compile(source.clone(), Lang::Ts)?;
            times.push(start.elapsed());
            output = compiled.javascript.len();
        }
        println!(
            "compile {label} of TypeScript ({} bytes -> {output} bytes of JavaScript with its \
             source map), {rounds} rounds: {}",
            source.len(),
            stats(times)
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
