//! A small HTTP client for the daemon's Unix-socket API, used by the CLI,
//! the demo and the benchmarks.

use std::path::{Path, PathBuf};

use crate::api::types::ErrorBody;
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// Talks to one daemon.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    /// How to start the daemon, for the error shown when none is running.
    up_hint: String,
}

impl Client {
    pub fn new(socket: &Path, up_hint: String) -> Self {
        Self {
            socket: socket.to_path_buf(),
            up_hint,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> Result<Response<Incoming>> {
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
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("cannot talk to the daemon")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
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
        Ok(response)
    }

    /// Turns an error response into the daemon's message.
    async fn check(response: Response<Incoming>) -> Result<Response<Incoming>> {
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(err) => bail!("{}", err.error),
            Err(_) => bail!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = Self::check(self.send(Method::GET, path, None).await?).await?;
        let body = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&body).context("the daemon sent an unreadable answer")
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let json = Bytes::from(serde_json::to_vec(body)?);
        let response = Self::check(
            self.send(Method::POST, path, Some((json, "application/json")))
                .await?,
        )
        .await?;
        let body = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&body).context("the daemon sent an unreadable answer")
    }

    /// Whether the daemon has the blob at `path`.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let response = self.send(Method::HEAD, path, None).await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => bail!("the daemon answered {other}"),
        }
    }

    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        Self::check(
            self.send(Method::PUT, path, Some((bytes, "application/octet-stream")))
                .await?,
        )
        .await?;
        Ok(())
    }

    /// POSTs `body` and returns a reader of the NDJSON lines of the answer.
    pub async fn post_stream<B: Serialize>(&self, path: &str, body: &B) -> Result<LineStream> {
        let json = Bytes::from(serde_json::to_vec(body)?);
        let response = Self::check(
            self.send(Method::POST, path, Some((json, "application/json")))
                .await?,
        )
        .await?;
        Ok(LineStream {
            body: response.into_body(),
            buffer: Vec::new(),
        })
    }
}

/// Reads a response body line by line.
#[derive(Debug)]
pub struct LineStream {
    body: Incoming,
    buffer: Vec<u8>,
}

impl LineStream {
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
                None => return Ok(None),
            }
        }
    }
}
