//! One audit record per proxied request, queued so the request path never
//! waits on disk. A background task hands queued records to the store all
//! at once, so the store's writer commits them in one group. A full queue
//! makes requests wait for room (backpressure) rather than lose records.
//! Records carry identity, role, method, normalized path, upstream status,
//! bytes and latency; never a credential or a token.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::mint::AccessTokenClaims;
use crate::store::{AuditDetail, AuditEvent, AuditKind, Store};

/// Records waiting for the store before senders wait.
const QUEUE: usize = 16 * 1024;

/// The audit record of one proxied request, filled in as it goes.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyRecord {
    #[serde(skip)]
    at_ms: i64,
    route: String,
    method: String,
    /// The normalized path below the route's prefix (or the whole path
    /// when the request was refused before that).
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip)]
    role: Option<String>,
    #[serde(skip)]
    issuer: Option<String>,
    #[serde(skip)]
    project_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pipeline_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<String>,
    /// The rule that allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The upstream's status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    request_bytes: u64,
    response_bytes: u64,
    duration_us: u64,
}

impl ProxyRecord {
    /// A record for a request just received.
    pub fn new(route: &str, method: &str, at_ms: i64) -> ProxyRecord {
        ProxyRecord {
            at_ms,
            route: route.to_owned(),
            method: method.to_owned(),
            path: String::new(),
            jti: None,
            sub: None,
            role: None,
            issuer: None,
            project_id: None,
            pipeline_id: None,
            job_id: None,
            rule: None,
            status: None,
            refused: None,
            detail: None,
            request_bytes: 0,
            response_bytes: 0,
            duration_us: 0,
        }
    }

    /// Who made the request (when the token was verified).
    pub fn set_identity(&mut self, claims: Option<&AccessTokenClaims>) {
        let Some(c) = claims else { return };
        self.jti = Some(c.jti.clone());
        self.sub = Some(c.sub.clone());
        self.role = Some(c.role.clone());
        self.issuer = Some(c.pipeline.issuer.clone());
        self.project_id = Some(c.pipeline.job_project_id.clone());
        self.pipeline_id = Some(c.pipeline.pipeline_id.clone());
        self.job_id = Some(c.pipeline.job_id.clone());
    }

    /// Refused, with the rule family and the detail (never a secret).
    pub fn refused(&mut self, family: &'static str, detail: &str) {
        self.refused = Some(family);
        self.detail = Some(detail.to_owned());
    }

    fn into_event(self) -> AuditEvent {
        AuditEvent {
            at_ms: self.at_ms,
            kind: if self.refused.is_some() {
                AuditKind::ProxyDenied
            } else {
                AuditKind::ProxyRequest
            },
            issuer: self.issuer.clone(),
            role: self.role.clone(),
            project_id: self.project_id.clone(),
            reason: self.refused.map(str::to_owned),
            detail: AuditDetail::from_serialize(&self),
        }
    }
}

/// What the queue carries.
enum Message {
    Record(Box<ProxyRecord>),
    Flush(oneshot::Sender<()>),
}

/// The sending side of the audit queue.
#[derive(Clone)]
pub struct AuditQueue {
    tx: mpsc::Sender<Message>,
}

impl AuditQueue {
    /// Starts the task that writes queued records to `store`.
    pub fn start(store: Arc<dyn Store>, metrics: Arc<crate::metrics::Metrics>) -> AuditQueue {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drain(rx, store, metrics));
        AuditQueue { tx }
    }

    /// Queues `record`; waits only when the queue is full.
    pub async fn send(&self, record: ProxyRecord) {
        let message = Message::Record(Box::new(record));
        let message = match self.tx.try_send(message) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(m)) => m,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("proxy audit queue closed; a record was not written");
                return;
            }
        };
        if self.tx.send(message).await.is_err() {
            tracing::error!("proxy audit queue closed; a record was not written");
        }
    }

    /// A place in the queue for a request's record, taken before the
    /// request is forwarded (waiting while the queue is full): the record,
    /// completed when the response body is dropped, then goes in without
    /// waiting and without growing anything unbounded. `None` only when the
    /// queue is closed (shutdown).
    pub async fn reserve(&self) -> Option<Slot> {
        match self.tx.clone().reserve_owned().await {
            Ok(permit) => Some(Slot(permit)),
            Err(_) => {
                tracing::error!("proxy audit queue closed; a record will not be written");
                None
            }
        }
    }

    /// Returns once every record queued before the call is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// A reserved place in the audit queue (see [`AuditQueue::reserve`]).
pub struct Slot(mpsc::OwnedPermit<Message>);

impl Slot {
    /// Queues `record` in the reserved place (never waits).
    pub fn send(self, record: ProxyRecord) {
        self.0.send(Message::Record(Box::new(record)));
    }
}

/// Most records written in one store call.
const BATCH: usize = 1024;

async fn drain(
    mut rx: mpsc::Receiver<Message>,
    store: Arc<dyn Store>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut events = Vec::with_capacity(batch.len());
        let mut flushes = Vec::new();
        for message in batch.drain(..) {
            match message {
                Message::Record(r) => events.push(r.into_event()),
                Message::Flush(done) => flushes.push(done),
            }
        }
        let n = events.len();
        // One write op for the whole batch: one entry in the writer's
        // queue, appended to the chain in order, in one transaction.
        if let Err(e) = store.append_audits(events).await {
            for _ in 0..n {
                metrics.proxy().audit_failed();
            }
            tracing::error!(error = %e, records = n, "proxy audit records could not be written");
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Bytes that went through a body.
#[derive(Debug, Clone, Default)]
pub struct ByteCounter(Arc<AtomicU64>);

impl ByteCounter {
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Completes a request's record when its response body is done.
pub struct Finish {
    /// The record so far.
    pub record: ProxyRecord,
    /// The request body's counter.
    pub request_bytes: ByteCounter,
    /// When the request arrived.
    pub started: Instant,
    /// Its reserved place in the audit queue.
    pub slot: Option<Slot>,
    /// The route's upstream connection permit, released with the body.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A body passed through unchanged (streamed, never buffered), counting
/// its bytes; with a [`Finish`], the record is sent when the body is
/// dropped (ended, failed or abandoned by the client).
pub struct Counted {
    inner: Body,
    counter: ByteCounter,
    finish: Option<Finish>,
}

impl Counted {
    /// Wraps `inner`.
    pub fn new(inner: Body, counter: ByteCounter, finish: Option<Finish>) -> Counted {
        Counted {
            inner,
            counter,
            finish,
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.add(data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            let mut record = f.record;
            record.request_bytes = f.request_bytes.get();
            record.response_bytes = self.counter.get();
            record.duration_us = u64::try_from(f.started.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Some(slot) = f.slot {
                slot.send(record);
            }
        }
    }
}
