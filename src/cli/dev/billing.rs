//! The example billing API `scriptd dev` serves on 127.0.0.1 so the bundled scripts can show
//! `fetch` with a secret: `POST /invoices` with the expected bearer token answers an invoice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves until the process ends; returns the port.
pub async fn serve(token: String) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let token = Arc::new(token);
    let numbers = Arc::new(AtomicU64::new(1000));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer(socket, token.clone(), numbers.clone()));
        }
    });
    Ok(port)
}

async fn answer(mut socket: TcpStream, token: Arc<String>, numbers: Arc<AtomicU64>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    // One small request per connection: the head and a body of the declared length.
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        if request.len() > 64 * 1024 {
            return;
        }
        let text = String::from_utf8_lossy(&request);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&request);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let authorised = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("authorization") && v.trim() == format!("Bearer {token}")
        })
    });
    let (status, reply) = if !head.starts_with("POST /invoices ") {
        (
            "404 Not Found",
            serde_json::json!({ "error": "no such route" }),
        )
    } else if !authorised {
        (
            "401 Unauthorized",
            serde_json::json!({ "error": "bad API key" }),
        )
    } else {
        let order: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let id = format!("inv-{}", numbers.fetch_add(1, Ordering::Relaxed));
        (
            "201 Created",
            serde_json::json!({ "id": id, "order": order["order"], "amount": order["total"], "currency": order["currency"] }),
        )
    };
    let reply = reply.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}
