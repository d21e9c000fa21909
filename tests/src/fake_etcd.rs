//! A gRPC `Maintenance` server that serves a snapshot the way etcd does, or
//! tampered with. Real etcd never sends a bad digest, so this is the one place
//! a fake stands in: to prove the agent rejects what it must.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbDefragmentRequest, PbDefragmentResponse, PbDowngradeRequest,
    PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest, PbHashResponse,
    PbMaintenanceServer, PbMaintenanceService, PbMoveLeaderRequest, PbMoveLeaderResponse,
    PbResponseHeader, PbSnapshotRequest, PbSnapshotResponse, PbStatusRequest, PbStatusResponse,
};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How the served snapshot differs from what etcd would send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Nothing: a correct stream.
    None,
    /// One byte of the database flipped after the digest was computed.
    FlipByte(usize),
    /// The final digest message left out.
    NoDigest,
    /// A digest of zeros.
    WrongDigest,
    /// Half the database sent, then silence (the stream stays open).
    Stall,
}

const CHUNK: usize = 32 * 1024;

#[derive(Clone)]
struct Service {
    db: std::sync::Arc<Vec<u8>>,
    tamper: Tamper,
}

/// A running fake; stops on drop.
pub struct FakeEtcd {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeEtcd {
    /// Serves `db` (a bbolt file without trailer) with `tamper` applied.
    pub fn start(db: Vec<u8>, tamper: Tamper) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake etcd");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let svc = Service {
            db: std::sync::Arc::new(db),
            tamper,
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(PbMaintenanceServer::new(svc))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Self {
            url: format!("http://{addr}"),
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for FakeEtcd {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header() -> Option<PbResponseHeader> {
    Some(PbResponseHeader {
        cluster_id: 0x1111,
        member_id: 0x2222,
        revision: 7,
        raft_term: 2,
    })
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<PbSnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PbMaintenanceService for Service {
    async fn alarm(&self, _: Request<PbAlarmRequest>) -> Result<Response<PbAlarmResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn status(
        &self,
        _: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        Ok(Response::new(PbStatusResponse {
            header: header(),
            version: "3.4.23".into(),
            db_size: self.db.len() as i64,
            leader: 0x2222,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        _: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn hash(&self, _: Request<PbHashRequest>) -> Result<Response<PbHashResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn hash_kv(
        &self,
        _: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let mut db = (*self.db).clone();
        let digest = Sha256::digest(&db).to_vec();
        let tamper = self.tamper;
        if let Tamper::FlipByte(at) = tamper {
            db[at] ^= 0x01;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let total = db.len();
            let stop_at = if tamper == Tamper::Stall {
                total / 2
            } else {
                total
            };
            let mut sent = 0;
            for chunk in db[..stop_at].chunks(CHUNK) {
                sent += chunk.len();
                let msg = PbSnapshotResponse {
                    header: header(),
                    remaining_bytes: (total - sent) as u64,
                    blob: chunk.to_vec(),
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            match tamper {
                Tamper::Stall => {
                    // Keep the stream open and silent until the client gives up.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Tamper::NoDigest => {}
                Tamper::WrongDigest => {
                    let _ = tx
                        .send(Ok(PbSnapshotResponse {
                            blob: vec![0u8; 32],
                            ..Default::default()
                        }))
                        .await;
                }
                Tamper::None | Tamper::FlipByte(_) => {
                    let _ = tx
                        .send(Ok(PbSnapshotResponse {
                            blob: digest,
                            ..Default::default()
                        }))
                        .await;
                }
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as SnapshotStream,
        ))
    }

    async fn move_leader(
        &self,
        _: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn downgrade(
        &self,
        _: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
