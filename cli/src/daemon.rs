//! `arca daemon`: the gRPC server.
use crate::services::{build, Defaults};
use crate::ServiceArgs;
use anyhow::{bail, Context, Result};
use arca_castore::grpc::{
    GrpcBlobBatchServiceWrapper, GrpcBlobServiceWrapper, GrpcDirectoryServiceWrapper,
    GrpcLocalIngestWrapper,
};
use arca_proto::castore::blob_service_server::BlobServiceServer;
use arca_proto::castore::directory_service_server::DirectoryServiceServer;
use arca_proto::castore_batch::blob_batch_service_server::BlobBatchServiceServer;
use arca_proto::store::path_info_service_server::PathInfoServiceServer;
use arca_store::grpc::GrpcPathInfoServiceWrapper;
use arca_store::pathinfoservice::CheckedPathInfoService;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;

#[derive(clap::Args)]
pub struct DaemonArgs {
    /// Where to listen: HOST:PORT or unix:///path/to/socket. Ignored under
    /// systemd socket activation.
    #[arg(long, env = "ARCA_LISTEN", default_value = "127.0.0.1:8000")]
    listen: String,
    /// A Nix secret key file (`nix key generate-secret`): every path info
    /// put through the daemon gets a signature by it (existing ones are kept).
    #[arg(long, env = "ARCA_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// Also serve the store as a Nix binary cache over HTTP on this address
    /// (HOST:PORT), like `arca serve-cache`; with --signing-key its narinfos
    /// are signed too.
    #[arg(long, env = "ARCA_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Unix socket where clients on this machine hand the daemon open files
    /// instead of uploading their bytes (`arca castore import`, `arca
    /// import`); `off` disables it. Who may use it is decided by the
    /// socket's permissions. Default: `$DATA/ingest.sock`.
    #[arg(long, env = "ARCA_INGEST_SOCKET")]
    ingest_socket: Option<String>,
    #[command(flatten)]
    http: crate::serve_cache::HttpCacheArgs,
}

/// The local ingest socket, bound, with its token; `None` when disabled or
/// when it cannot be bound (then clients upload over gRPC).
fn bind_ingest_socket(
    args: &DaemonArgs,
    service_args: &ServiceArgs,
) -> Result<Option<(tokio::net::UnixListener, PathBuf, [u8; 16])>> {
    let path = match args.ingest_socket.as_deref() {
        Some("off") => return Ok(None),
        Some(p) => PathBuf::from(p),
        None => crate::data_dir(service_args)?.join("ingest.sock"),
    };
    if !path.is_absolute() {
        bail!(
            "--ingest-socket {}: expected an absolute path or off",
            path.display()
        );
    }
    let token = arca_castore::local_ingest::new_token().context("making a token")?;
    match arca_castore::local_ingest::bind(&path) {
        Ok(l) => Ok(Some((l, path, token))),
        Err(e) => {
            eprintln!(
                "arca daemon: not taking open files on {}: {e} (clients upload over gRPC)",
                path.display()
            );
            Ok(None)
        }
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, Option<PathBuf>),
}

/// The socket passed by systemd (LISTEN_PID/LISTEN_FDS), if any.
fn socket_activation() -> Result<Option<Listener>> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if !pid_matches || fds == 0 {
        return Ok(None);
    }
    if fds > 1 {
        bail!("socket activation passed {fds} sockets; arca daemon takes one");
    }
    const FD: i32 = 3;
    // SAFETY: getsockname only writes into the storage we pass.
    let family = unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(FD, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            bail!(
                "LISTEN_FDS is set but fd 3 is not a socket: {}",
                std::io::Error::last_os_error()
            );
        }
        addr.ss_family as i32
    };
    // SAFETY: systemd hands fd 3 to us; nothing else in this process owns it.
    Ok(Some(match family {
        libc::AF_UNIX => {
            let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(FD) };
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?, None)
        }
        libc::AF_INET | libc::AF_INET6 => {
            let l = unsafe { std::net::TcpListener::from_raw_fd(FD) };
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
        other => bail!("socket activation passed a socket of unsupported family {other}"),
    }))
}

async fn bind(listen: &str) -> Result<Listener> {
    if let Some(l) = socket_activation()? {
        return Ok(l);
    }
    if let Some(rest) = listen.strip_prefix("unix://") {
        let path = PathBuf::from(rest);
        if !path.is_absolute() {
            bail!("--listen {listen}: expected unix:///absolute/path");
        }
        if path.exists() {
            // A socket left behind by an earlier run; refuse to clobber anything else.
            let meta = std::fs::symlink_metadata(&path)?;
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!(
                    "--listen {listen}: {} exists and is not a socket",
                    path.display()
                );
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let l = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("listening on {listen}"))?;
        return Ok(Listener::Unix(l, Some(path)));
    }
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    Ok(Listener::Tcp(l))
}

/// Refuses a gRPC service URL pointing at the daemon's own address: every
/// call would be forwarded to itself, forever.
fn refuse_self_reference(listen: &str, args: &ServiceArgs) -> Result<()> {
    let own = [format!("grpc+http://{listen}"), format!("grpc+{listen}")];
    for (flag, url) in [
        (
            "--blob-service-addr / BLOB_SERVICE_ADDR",
            &args.blob_service_addr,
        ),
        (
            "--directory-service-addr / DIRECTORY_SERVICE_ADDR",
            &args.directory_service_addr,
        ),
        (
            "--path-info-service-addr / PATH_INFO_SERVICE_ADDR",
            &args.path_info_service_addr,
        ),
    ] {
        if let Some(url) = url {
            if own.iter().any(|o| url.trim_end_matches('/') == o) {
                bail!("{flag} is {url}, the daemon's own address: it would forward every call to itself");
            }
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one: a daemon serving
/// many clients holds many (connections, stored files passed to local
/// readers, sled's), and the usual soft limit of 1024 is far below what
/// the system allows.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::debug!(
                    "raising the open files limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

pub async fn run(args: DaemonArgs, service_args: ServiceArgs) -> Result<()> {
    refuse_self_reference(&args.listen, &service_args)?;
    raise_open_files_limit();
    let services = build(&service_args, Defaults::Embedded)?;
    let mut path_info = services.path_info.clone();
    let key = args
        .signing_key
        .as_deref()
        .map(crate::serve_cache::load_signing_key)
        .transpose()?;
    if let Some(key) = &key {
        path_info = Arc::new(arca_store::pathinfoservice::SigningPathInfoService::new(
            path_info,
            key.clone(),
        ));
    }
    // The binary cache over HTTP: reads from and (checked) uploads into the same stack.
    let http = match &args.http_listen {
        None => None,
        Some(addr) => {
            let router =
                crate::serve_cache::router(&services, path_info.clone(), key.clone(), &args.http)?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http-listen {addr}"))?;
            Some((l, router))
        }
    };
    let listener = bind(&args.listen).await?;
    let ingest = bind_ingest_socket(&args, &service_args)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BlobServiceServer<GrpcBlobServiceWrapper>>()
        .await;
    health_reporter
        .set_serving::<DirectoryServiceServer<GrpcDirectoryServiceWrapper>>()
        .await;
    health_reporter
        .set_serving::<BlobBatchServiceServer<GrpcBlobBatchServiceWrapper>>()
        .await;
    health_reporter
        .set_serving::<PathInfoServiceServer<GrpcPathInfoServiceWrapper>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(arca_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(arca_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building reflection service")?;

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(arca_castore::HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(arca_castore::HTTP2_CONNECTION_WINDOW))
        .max_frame_size(Some(arca_castore::HTTP2_MAX_FRAME_SIZE))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(GrpcBlobServiceWrapper::new(services.blob.clone()).into_server())
        .add_service(GrpcBlobBatchServiceWrapper::new(services.blob.clone()).into_server())
        .add_optional_service(ingest.as_ref().map(|(_, path, token)| {
            GrpcLocalIngestWrapper::new(path.display().to_string(), *token)
                .with_exports(true)
                // Blob files passed to local readers (a store on local disk).
                .with_reads(services.blob.stored_files().is_some())
                .into_server()
        }))
        .add_service(GrpcDirectoryServiceWrapper::new(services.directory.clone()).into_server())
        .add_service(
            GrpcPathInfoServiceWrapper::new(
                // Path infos enter the store here: refuse any whose castore
                // closure or references are missing.
                Arc::new(CheckedPathInfoService::new(
                    path_info,
                    services.blob.clone(),
                    services.directory.clone(),
                )),
                services.blob.clone(),
                services.directory.clone(),
            )
            .into_server(),
        );

    // One signal stops both servers: health turns NOT_SERVING, then both stop
    // accepting and let running calls finish.
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let reporter = health_reporter.clone();
        let stop = stop.clone();
        let signalled = crate::serve_cache::shutdown_signal();
        tokio::spawn(async move {
            signalled.await;
            reporter
                .set_not_serving::<BlobServiceServer<GrpcBlobServiceWrapper>>()
                .await;
            reporter
                .set_not_serving::<BlobBatchServiceServer<GrpcBlobBatchServiceWrapper>>()
                .await;
            reporter
                .set_not_serving::<DirectoryServiceServer<GrpcDirectoryServiceWrapper>>()
                .await;
            reporter
                .set_not_serving::<PathInfoServiceServer<GrpcPathInfoServiceWrapper>>()
                .await;
            stop.cancel();
        });
    }
    let shutdown = stop.clone().cancelled_owned();
    let ingest_server = ingest.map(|(listener, path, token)| {
        // The socket also renders NARs into descriptors clients pass
        // (`arca nar dump`).
        let export =
            arca_store::nar::NarExport::new(services.blob.clone(), services.directory.clone());
        let task = tokio::spawn(arca_castore::local_ingest::serve(
            listener,
            token,
            services.blob.clone(),
            Some(Arc::new(export)),
        ));
        (task, path)
    });
    let http_server = match http {
        None => None,
        Some((l, router)) => {
            let addr = l.local_addr()?;
            let stop = stop.clone();
            Some((
                addr,
                tokio::spawn(arca_store::http_cache::serve(
                    l,
                    router,
                    stop.cancelled_owned(),
                )),
            ))
        }
    };
    let grpc = async {
        match listener {
            Listener::Tcp(l) => {
                let addr = l.local_addr()?;
                eprintln!("arca daemon listening on {addr}");
                if let Some((http_addr, _)) = &http_server {
                    eprintln!("arca daemon serving the Nix binary cache on http://{http_addr}");
                }
                // serve_with_incoming does not apply the server's tcp_nodelay: set it on
                // each connection, or small responses wait for delayed ACKs (40 ms each).
                let incoming = TcpListenerStream::new(l).map(|s| {
                    s.and_then(|s| {
                        s.set_nodelay(true)?;
                        Ok(s)
                    })
                });
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await?;
            }
            Listener::Unix(l, path) => {
                let shown = path
                    .as_ref()
                    .map(|p| format!("unix://{}", p.display()))
                    .unwrap_or_else(|| "the activated socket".into());
                eprintln!("arca daemon listening on {shown}");
                if let Some((http_addr, _)) = &http_server {
                    eprintln!("arca daemon serving the Nix binary cache on http://{http_addr}");
                }
                router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                    .await?;
                if let Some(p) = path {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        anyhow::Ok(())
    };
    let grpc_result = grpc.await;
    // The gRPC server stopped (drained, or failed): stop HTTP and local ingest too.
    stop.cancel();
    if let Some((task, path)) = ingest_server {
        task.abort();
        let _ = task.await;
        let _ = std::fs::remove_file(path);
    }
    if let Some((_, task)) = http_server {
        task.await
            .context("the HTTP server task failed")?
            .context("serving HTTP")?;
    }
    grpc_result?;
    eprintln!("arca daemon stopped");
    Ok(())
}
