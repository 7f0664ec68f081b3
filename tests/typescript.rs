//! TypeScript scripts through the `scriptd` binary on the real services: compiled once at
//! deploy (the version keeps the TypeScript, its sha256 and the JavaScript that runs),
//! syntax errors refused with file:line:column, failures pointing at TypeScript lines,
//! `scripts test` and `validate` on .ts files, and `scriptd types`.

mod support;

use std::time::Duration;

use support::{json, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

/// A handler with erasable types and syntax that needs compiling (an enum, a parameter
/// property); it throws from line 12, column 15 for an order without lines.
const HANDLER: &str = r#"import type { Handler } from "scriptd";

enum Status { Open = "open", Empty = "empty" }

interface Line { price: number; qty: number }

class Order {
  constructor(public readonly lines: Line[]) {}
  total(): number {
    const lines: Line[] = this.lines;
    if (lines.length === 0) {
      throw new RangeError("an order without lines");
    }
    return lines.reduce((sum: number, l: Line) => sum + l.price * l.qty, 0);
  }
}

const handler: Handler<{ lines: Line[] }> = (event) => {
  const order = new Order(event.data.lines);
  return { status: Status.Open, total: order.total() };
};
export default handler;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typescript_script_is_compiled_once_and_fails_at_its_own_lines() {
    let env = TestEnv::new().await;
    let file = env.write_script("orders.ts", HANDLER);
    let file = file.to_str().unwrap();
    let deploy = [
        "scripts",
        "deploy",
        file,
        "--tenant",
        "acme",
        "--name",
        "orders",
        "--on",
        "order.*",
        "--max-attempts",
        "1",
    ];
    env.cli_ok(&deploy);
    // The version keeps the TypeScript and names it by its sha256; what runs is JavaScript.
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT source, typescript, sha256 FROM script_versions WHERE version = 1",
            &[],
        )
        .await
        .unwrap();
    let (javascript, typescript, sha256): (String, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(typescript.as_deref(), Some(HANDLER));
    assert_eq!(sha256, scriptd::store::sha256_hex(HANDLER));
    assert!(!javascript.contains("interface Line"), "{javascript}");
    assert!(!javascript.contains("import type"), "{javascript}");
    // The same file again is the same version.
    let again = env.cli_ok(&deploy);
    assert!(String::from_utf8_lossy(&again.stdout).contains("source unchanged, still v1"));

    let daemon = env.start_daemon();
    env.publish(
        "acme",
        "order.paid",
        r#"{"lines": [{"price": 2, "qty": 3}]}"#,
    )
    .await;
    env.publish("acme", "order.empty", r#"{"lines": []}"#).await;
    let runs = env.wait_for_runs(WAIT, |runs| runs.len() == 2).await;
    let failed = runs
        .iter()
        .find(|r| r.status != "ok")
        .expect("a failed run");
    let client_runs = client
        .query(
            "SELECT result, failure_stack FROM runs ORDER BY status",
            &[],
        )
        .await
        .unwrap();
    let result: serde_json::Value = client_runs
        .iter()
        .find_map(|r| r.get::<_, Option<serde_json::Value>>(0))
        .expect("the ok run's result");
    assert_eq!(result, serde_json::json!({ "status": "open", "total": 6 }));
    assert_eq!(failed.failure_kind.as_deref(), Some("exception"));
    let stack: String = client_runs
        .iter()
        .find_map(|r| r.get::<_, Option<String>>(1))
        .expect("the failed run's stack");
    assert!(stack.contains("orders@v1.ts:12:"), "{stack}");
    assert!(!stack.contains("orders@v1.js"), "{stack}");
    daemon.shutdown().await;

    // `scripts show --source` gives back what the tenant wrote.
    let shown = env.cli_ok(&[
        "scripts", "show", "--tenant", "acme", "--name", "orders", "--source",
    ]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("language:  typescript"), "{shown}");
    assert!(
        shown.contains("interface Line { price: number; qty: number }"),
        "{shown}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_errors_are_refused_with_file_line_and_column() {
    let env = TestEnv::new().await;
    let broken = env.write_script(
        "broken.ts",
        "const rate: number = 2;\nexport default (e: unknown) => { return rate * ; };\n",
    );
    let broken = broken.to_str().unwrap();
    let out = env
        .daemon_command()
        .args([
            "scripts", "deploy", broken, "--tenant", "acme", "--name", "broken",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{broken}:2:")), "{stderr}");
    assert!(env.store.script("acme", "broken").await.unwrap().is_none());
    let out = env
        .daemon_command()
        .args(["scripts", "validate", broken])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with(&format!("{broken}:2:")), "{stdout}");
    // A failure while loading (not a syntax error) also names the TypeScript line.
    let throws = env.write_script(
        "throws.ts",
        "type N = number;\nconst n: N = 1;\n\nthrow new Error('at load ' + n);\nexport default () => n;\n",
    );
    let out = env
        .daemon_command()
        .args(["scripts", "validate", throws.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}:4:", throws.display())),
        "{stdout}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_test_takes_typescript_by_extension_or_by_lang() {
    let env = TestEnv::new().await;
    let file = env.write_script("orders.ts", HANDLER);
    let data = r#"{"lines": [{"price": 5, "qty": 2}]}"#;
    let out = json(env.cli_ok(&[
        "scripts",
        "test",
        file.to_str().unwrap(),
        "--tenant",
        "acme",
        "--data",
        data,
        "--json",
    ]));
    assert_eq!(
        out["result"],
        serde_json::json!({ "status": "open", "total": 10 })
    );
    // No extension: --lang says it is TypeScript.
    let bare = env.write_script("orders-handler", HANDLER);
    let bare = bare.to_str().unwrap();
    let refused = env
        .daemon_command()
        .args([
            "scripts", "test", bare, "--tenant", "acme", "--data", data, "--json",
        ])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "read as JavaScript, it does not compile"
    );
    let out = json(env.cli_ok(&[
        "scripts", "test", bare, "--lang", "ts", "--tenant", "acme", "--data", data, "--json",
    ]));
    assert_eq!(out["result"]["total"], 10);
    env.cleanup().await;
}

#[test]
fn scriptd_types_declares_the_event_ctx_and_fetch() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scriptd"))
        .arg("types")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for declared in [
        "declare module \"scriptd\"",
        "export interface Event<",
        "export interface Context",
        "export type Handler<",
        "declare function fetch(",
        "\"PermissionDenied\"",
    ] {
        assert!(text.contains(declared), "{declared} missing");
    }
}
