//! A small HTTP/1.1 server on 127.0.0.1 for fetch tests: fixed routes, one request per
//! connection, counting what it sends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Routes: `/hello` (JSON), `/echo` (the request's method, headers and body as JSON),
/// `/redirect?to=URL` (302), `/slow` (answers after 60 s), `/huge` (100 MiB, no length
/// given), `/huge-declared` (100 MiB with its length).
pub struct TestServer {
    pub port: u16,
    /// Body bytes written by `/huge*` routes.
    pub huge_sent: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

pub const HUGE: u64 = 100 * 1024 * 1024;

impl TestServer {
    pub async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let huge_sent = Arc::new(AtomicU64::new(0));
        let sent = huge_sent.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(socket, sent.clone()));
            }
        });
        TestServer {
            port,
            huge_sent,
            connections,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut socket: TcpStream, sent: Arc<AtomicU64>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let Ok(n) = socket.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("/").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = request[head_end..].to_vec();
    while body.len() < length {
        let Ok(n) = socket.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    match path {
        "/hello" => respond(&mut socket, "200 OK", &[], br#"{"hello":"world"}"#).await,
        "/echo" => {
            let echo = serde_json::json!({
                "method": method,
                "headers": headers.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "body": String::from_utf8_lossy(&body),
            });
            respond(&mut socket, "200 OK", &[], echo.to_string().as_bytes()).await
        }
        "/redirect" => {
            let to = query.strip_prefix("to=").unwrap_or("/hello");
            respond(&mut socket, "302 Found", &[("Location", to)], b"").await
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            respond(&mut socket, "200 OK", &[], b"late").await
        }
        "/huge" | "/huge-declared" => {
            let mut head = "HTTP/1.1 200 OK\r\nConnection: close\r\n".to_owned();
            if path == "/huge-declared" {
                head.push_str(&format!("Content-Length: {HUGE}\r\n"));
            }
            head.push_str("\r\n");
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = HUGE;
            while left > 0 {
                if socket.write_all(&chunk).await.is_err() {
                    return;
                }
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                left -= chunk.len() as u64;
            }
        }
        _ => respond(&mut socket, "404 Not Found", &[], b"no such route").await,
    }
}

async fn respond(socket: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(body).await;
    let _ = socket.shutdown().await;
}
