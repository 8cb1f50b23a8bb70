//! A real local HTTP server for tests of the `http` job kind (the endpoint is the one
//! thing we do not own, so the test serves it).

/// A real local HTTP server: each path answers with its list of status codes in turn
/// (repeating the last). Returns its base URL. It runs until the test ends.
pub async fn http_server(routes: Vec<(&'static str, Vec<u16>)>) -> String {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    type Routes = Arc<Mutex<HashMap<String, (Vec<u16>, usize)>>>;
    let routes: Routes = Arc::new(Mutex::new(
        routes.into_iter().map(|(p, c)| (p.to_string(), (c, 0))).collect(),
    ));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let routes = routes.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                // Read until the end of the headers (bodies are small and ignored).
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") && got < buf.len() {
                    match sock.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..got]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let code = {
                    let mut r = routes.lock().unwrap();
                    match r.get_mut(&path) {
                        Some((codes, i)) => {
                            let c = codes[(*i).min(codes.len() - 1)];
                            *i += 1;
                            c
                        }
                        None => 404,
                    }
                };
                let resp = format!("HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}
