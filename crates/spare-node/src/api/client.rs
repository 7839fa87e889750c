//! A small HTTP client for the daemon's Unix-socket API, used by the CLI,
//! the demo and the benchmarks.
//!
//! Connections are kept alive and reused: a request takes an idle
//! connection if there is one and gives it back once its response has been
//! read to the end.
//!
//! A daemon that does not answer (stopped with `SIGSTOP`, or stuck) does
//! not hang its caller: every request gets its whole answer, or for a
//! stream its response head, within the client's timeout. The lines of a
//! stream (a task's events) may take as long as the task runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api::types::ErrorBody;

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

/// How long a request waits for the daemon's answer by default: far more
/// than any answer of a running daemon takes (storing a 64 MiB blob
/// included), short enough that a stopped one is noticed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

type Sender = SendRequest<Full<Bytes>>;

/// Talks to one daemon. Clones share their idle connections.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    /// How to start the daemon, for the error shown when none is running.
    up_hint: String,
    /// How long a request may wait for its answer.
    timeout: Duration,
    idle: Arc<Mutex<Vec<Sender>>>,
}

/// A response and the connection to give back once its body is read.
struct Exchange {
    response: Response<Incoming>,
    sender: Sender,
}

impl Client {
    pub fn new(socket: &Path, up_hint: String) -> Self {
        Self {
            socket: socket.to_path_buf(),
            up_hint,
            timeout: DEFAULT_TIMEOUT,
            idle: Arc::default(),
        }
    }

    /// The same client with another timeout for each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `request` within the timeout.
    async fn timed<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result,
            Err(_) => bail!(
                "the daemon at {} did not answer within {}; is it stopped?",
                self.socket.display(),
                spare_core::units::format_duration(self.timeout)
            ),
        }
    }

    /// An idle connection that is still open, or a new one.
    async fn sender(&self) -> Result<Sender> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(mut sender) => {
                    if !sender.is_closed() && sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    async fn connect(&self) -> Result<Sender> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            use std::io::ErrorKind::{ConnectionRefused, NotFound};
            if matches!(e.kind(), NotFound | ConnectionRefused) {
                anyhow!(
                    "no spare daemon is running on {} (start one with `{}`)",
                    self.socket.display(),
                    self.up_hint
                )
            } else {
                anyhow!(
                    "cannot connect to the daemon at {}: {e}",
                    self.socket.display()
                )
            }
        })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("cannot talk to the daemon")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Gives a connection back for reuse, once its last response was read.
    fn release(&self, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !sender.is_closed() && idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> Result<Exchange> {
        let mut sender = self.sender().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "spare");
        let body = match body {
            Some((bytes, content_type)) => {
                request = request.header("content-type", content_type);
                Full::new(bytes)
            }
            None => Full::new(Bytes::new()),
        };
        let response = sender
            .send_request(request.body(body)?)
            .await
            .context("the daemon closed the connection")?;
        Ok(Exchange { response, sender })
    }

    /// Reads a whole response body and gives the connection back.
    async fn body(&self, exchange: Exchange) -> Result<(StatusCode, Bytes)> {
        let status = exchange.response.status();
        let body = exchange.response.into_body().collect().await?.to_bytes();
        self.release(exchange.sender);
        Ok((status, body))
    }

    /// The body of a successful response, or the daemon's error message.
    async fn success(&self, exchange: Exchange) -> Result<Bytes> {
        let (status, body) = self.body(exchange).await?;
        if status.is_success() {
            return Ok(body);
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => bail!("{}", err.error),
            Err(_) => bail!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let body = self
            .timed(async {
                self.success(self.send(Method::GET, path, None).await?)
                    .await
            })
            .await?;
        serde_json::from_slice(&body).context("the daemon sent an unreadable answer")
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let json = Bytes::from(serde_json::to_vec(body)?);
        let body = self
            .timed(async {
                let exchange = self
                    .send(Method::POST, path, Some((json, "application/json")))
                    .await?;
                self.success(exchange).await
            })
            .await?;
        serde_json::from_slice(&body).context("the daemon sent an unreadable answer")
    }

    /// Whether the daemon has the blob at `path`.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let (status, _) = self
            .timed(async { self.body(self.send(Method::HEAD, path, None).await?).await })
            .await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => bail!("the daemon answered {other}"),
        }
    }

    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        self.timed(async {
            let exchange = self
                .send(Method::PUT, path, Some((bytes, "application/octet-stream")))
                .await?;
            self.success(exchange).await
        })
        .await?;
        Ok(())
    }

    /// POSTs `body` and returns a reader of the NDJSON lines of the answer.
    /// The response head must come within the timeout; the lines may take
    /// as long as they take.
    pub async fn post_stream<B: Serialize>(&self, path: &str, body: &B) -> Result<LineStream> {
        let json = Bytes::from(serde_json::to_vec(body)?);
        let exchange = self
            .timed(async {
                let exchange = self
                    .send(Method::POST, path, Some((json, "application/json")))
                    .await?;
                if !exchange.response.status().is_success() {
                    self.success(exchange).await?;
                    bail!("the daemon refused the request");
                }
                Ok(exchange)
            })
            .await?;
        Ok(LineStream {
            body: exchange.response.into_body(),
            buffer: Vec::new(),
            connection: Some((self.clone(), exchange.sender)),
        })
    }
}

/// Reads a response body line by line.
#[derive(Debug)]
pub struct LineStream {
    body: Incoming,
    buffer: Vec<u8>,
    /// Given back to the client when the body ends.
    connection: Option<(Client, Sender)>,
}

impl LineStream {
    /// Reads the rest of the stream and gives its connection back for
    /// reuse.
    pub async fn close(mut self) -> Result<()> {
        while self.next::<serde_json::Value>().await?.is_some() {}
        Ok(())
    }

    /// The next line parsed as JSON, or `None` at the end.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=pos).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .context("the daemon sent an unreadable event");
            }
            match self.body.frame().await {
                Some(frame) => {
                    let frame = frame.map_err(|_| {
                        anyhow::anyhow!(
                            "the spare daemon closed the connection before the task ended \
                             (did it stop? its log says why)"
                        )
                    })?;
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None => {
                    if let Some((client, sender)) = self.connection.take() {
                        client.release(sender);
                    }
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A daemon on `socket` that reads each request's head and then does
    /// what `answer` does with the connection.
    fn serve<F, Fut>(socket: &Path, answer: F)
    where
        F: Fn(UnixStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                tokio::spawn(answer(stream));
            }
        });
    }

    #[tokio::test]
    async fn a_daemon_that_does_not_answer_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        // Accepts, as the kernel does for a stopped daemon, never answers.
        serve(&socket, |stream| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        });
        let client =
            Client::new(&socket, "spare up".into()).with_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let get = client.get::<serde_json::Value>("/v1/status").await;
            let stream = client.post_stream("/v1/tasks", &()).await;
            (get, stream.map(|_| ()))
        })
        .await
        .expect("the client gives up by itself");
        for err in [outcome.0.unwrap_err(), outcome.1.unwrap_err()] {
            assert_eq!(
                err.to_string(),
                format!(
                    "the daemon at {} did not answer within 200 ms; is it stopped?",
                    socket.display()
                )
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(30));
        assert_eq!(Client::new(&socket, String::new()).timeout, DEFAULT_TIMEOUT);
    }

    #[tokio::test]
    async fn a_stream_may_take_longer_than_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        // The head at once, the lines well after the timeout, as a task's
        // events come while it runs.
        serve(&socket, |mut stream| async move {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                      transfer-encoding: chunked\r\n\r\n",
                )
                .await;
            for line in [&b"{\"n\":1}\n"[..], b"{\"n\":2}\n"] {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let chunk = [format!("{:x}\r\n", line.len()).as_bytes(), line, b"\r\n"].concat();
                let _ = stream.write_all(&chunk).await;
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let client =
            Client::new(&socket, "spare up".into()).with_timeout(Duration::from_millis(100));
        let mut lines = client.post_stream("/v1/tasks", &()).await.unwrap();
        let mut seen = Vec::new();
        while let Some(line) = lines.next::<serde_json::Value>().await.unwrap() {
            seen.push(line["n"].as_u64().unwrap());
        }
        assert_eq!(seen, [1, 2]);
    }
}
