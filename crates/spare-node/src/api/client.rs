//! A small HTTP client for the daemon's Unix-socket API, used by the CLI,
//! the demo and the benchmarks.
//!
//! Connections are kept alive and reused: a request takes an idle
//! connection if there is one and gives it back once its response has been
//! read to the end.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

type Sender = SendRequest<Full<Bytes>>;

/// Talks to one daemon. Clones share their idle connections.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    /// How to start the daemon, for the error shown when none is running.
    up_hint: String,
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
            idle: Arc::default(),
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
            .success(self.send(Method::GET, path, None).await?)
            .await?;
        serde_json::from_slice(&body).context("the daemon sent an unreadable answer")
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let json = Bytes::from(serde_json::to_vec(body)?);
        let exchange = self
            .send(Method::POST, path, Some((json, "application/json")))
            .await?;
        let body = self.success(exchange).await?;
        serde_json::from_slice(&body).context("the daemon sent an unreadable answer")
    }

    /// Whether the daemon has the blob at `path`.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let (status, _) = self
            .body(self.send(Method::HEAD, path, None).await?)
            .await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => bail!("the daemon answered {other}"),
        }
    }

    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        let exchange = self
            .send(Method::PUT, path, Some((bytes, "application/octet-stream")))
            .await?;
        self.success(exchange).await?;
        Ok(())
    }

    /// POSTs `body` and returns a reader of the NDJSON lines of the answer.
    pub async fn post_stream<B: Serialize>(&self, path: &str, body: &B) -> Result<LineStream> {
        let json = Bytes::from(serde_json::to_vec(body)?);
        let exchange = self
            .send(Method::POST, path, Some((json, "application/json")))
            .await?;
        if !exchange.response.status().is_success() {
            self.success(exchange).await?;
            bail!("the daemon refused the request");
        }
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
                    if let Ok(data) = frame.context("the daemon's stream broke")?.into_data() {
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
