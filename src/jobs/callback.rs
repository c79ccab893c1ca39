//! Callbacks: a job's final answer (whatever ended it: its run, a cancel, a lost node) POSTed
//! once to the URL its submission gave, signed with
//! HMAC-SHA256 over the body (`X-Perfbox-Signature: sha256=<hex>`), retried with backoff, the
//! outcome kept in the job's record. Only hosts the config allows (`[callbacks] allowed_hosts`)
//! are called, never through a redirect.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// Why a callback URL is refused at submission.
pub fn check_url(raw: &str, allowed: &[String]) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("callback_url {raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "callback_url must be http:// or https://, got {raw:?}"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("callback_url must not carry credentials".into());
    }
    let host = url.host_str().unwrap_or("");
    let port = url.port_or_known_default().unwrap_or(0);
    let with_port = format!("{host}:{port}");
    if !allowed.iter().any(|a| *a == host || *a == with_port) {
        return Err(if allowed.is_empty() {
            "callbacks are off on this service ([callbacks] allowed_hosts is empty)".into()
        } else {
            format!(
                "callback host {with_port} is not allowed here (allowed: {})",
                allowed.join(", ")
            )
        });
    }
    Ok(url)
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `body`): what the receiver recomputes.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What became of a callback (kept in the job record as `callback`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    /// Where it went.
    pub url: String,
    /// A 2xx answer came.
    pub delivered: bool,
    /// Tries made.
    pub attempts: u32,
    /// The last HTTP status, if any answer came.
    pub status: Option<u16>,
    /// Why the last try failed, if it did.
    pub error: Option<String>,
}

/// POST `body` to `url` until a 2xx answer or `max_attempts` tries, waiting `first_backoff`,
/// then twice as long each time (at most a minute), between them.
pub async fn deliver(
    url: &reqwest::Url,
    body: &[u8],
    secret: &[u8],
    job: i64,
    max_attempts: u32,
    first_backoff: Duration,
) -> Delivery {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build();
    let mut d = Delivery {
        url: url.to_string(),
        delivered: false,
        attempts: 0,
        status: None,
        error: None,
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            d.error = Some(format!("cannot set up the HTTP client: {e}"));
            return d;
        }
    };
    let signature = sign(secret, body);
    let mut backoff = first_backoff;
    while d.attempts < max_attempts.max(1) {
        if d.attempts > 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
        d.attempts += 1;
        let sent = client
            .post(url.clone())
            .header("content-type", "application/json")
            .header("x-perfbox-signature", &signature)
            .header("x-perfbox-job", job.to_string())
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(r) => {
                d.status = Some(r.status().as_u16());
                if r.status().is_success() {
                    d.delivered = true;
                    d.error = None;
                    return d;
                }
                d.error = Some(format!("answered {}", r.status()));
            }
            Err(e) => d.error = Some(format!("cannot reach it: {e}")),
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_hosts_plain_urls() {
        let allowed = vec![
            "127.0.0.1:9000".to_string(),
            "hooks.example.org".to_string(),
        ];
        check_url("http://127.0.0.1:9000/done", &allowed).unwrap();
        check_url("https://hooks.example.org/x", &allowed).unwrap();
        for bad in [
            "http://127.0.0.1:9001/done",
            "http://169.254.169.254/latest",
            "file:///etc/passwd",
            "http://user:pw@hooks.example.org/",
            "not a url",
        ] {
            assert!(check_url(bad, &allowed).is_err(), "{bad}");
        }
        assert!(
            check_url("http://127.0.0.1:9000/", &[])
                .unwrap_err()
                .contains("off")
        );
    }

    #[test]
    fn signature_is_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn retries_until_a_2xx_and_says_how_it_went() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            for status in ["500 Internal Server Error", "200 OK"] {
                let (mut c, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let n = c.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                c.write_all(answer.as_bytes()).await.unwrap();
            }
            seen
        });
        let url = reqwest::Url::parse(&format!("http://{addr}/hook")).unwrap();
        let d = deliver(&url, b"{\"perf\":1}", b"k", 7, 3, Duration::from_millis(10)).await;
        assert!(d.delivered, "{d:?}");
        assert_eq!((d.attempts, d.status), (2, Some(200)));
        let seen = server.await.unwrap();
        assert!(
            seen[1].contains(&sign(b"k", b"{\"perf\":1}")),
            "{}",
            seen[1]
        );
        assert!(seen[1].to_lowercase().contains("x-perfbox-job: 7"));
        // Nobody listening: every try fails, and the record says why.
        let gone = reqwest::Url::parse(&format!("http://{addr}/hook")).unwrap();
        let d = deliver(&gone, b"{}", b"k", 7, 2, Duration::from_millis(10)).await;
        assert!(
            !d.delivered && d.attempts == 2 && d.error.is_some(),
            "{d:?}"
        );
    }
}
