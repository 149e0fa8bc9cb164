//! Time ranges and pages of the results lists, the same over HTTP and gRPC: items whose window
//! starts in `[from, to)`, at most a page at a time, continued with an opaque page token (the
//! store key where the previous page stopped, base64url).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Error, Result};
use crate::store::PageRequest;

/// The page size when a request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;
/// The largest page served (about 2.5 MB of 32-bucket windows: under gRPC's 4 MiB default).
pub const MAX_PAGE_SIZE: u32 = 5_000;

/// A page request from a list call's fields: `from` (0: the oldest), `to` (exclusive; 0: no
/// bound), `size` (0: [`DEFAULT_PAGE_SIZE`]) and the previous answer's token ("" for the first
/// page).
pub fn page_request(from: u64, to: u64, size: u32, token: &str) -> Result<PageRequest> {
    let to = if to == 0 { u64::MAX } else { to };
    if from > to {
        return Err(Error::InvalidRequest(format!(
            "from = {from} is after to = {to}: give a range with from <= to (seconds since the epoch)"
        )));
    }
    if size > MAX_PAGE_SIZE {
        return Err(Error::InvalidRequest(format!(
            "a page holds at most {MAX_PAGE_SIZE} items; ask for fewer and follow next_page_token"
        )));
    }
    let after = if token.is_empty() {
        None
    } else {
        Some(URL_SAFE_NO_PAD.decode(token).map_err(|_| {
            Error::InvalidRequest(
                "page_token is not one this service issued: pass next_page_token unchanged".into(),
            )
        })?)
    };
    Ok(PageRequest {
        from,
        to,
        limit: if size == 0 { DEFAULT_PAGE_SIZE } else { size } as usize,
        after,
    })
}

/// The token that continues after a page ("" when it was the last).
pub fn next_token(next: Option<&[u8]>) -> String {
    next.map(|k| URL_SAFE_NO_PAD.encode(k)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let r = page_request(0, 0, 0, "").unwrap();
        assert_eq!((r.from, r.to, r.limit, r.after), (0, u64::MAX, 1_000, None));
        assert!(page_request(10, 5, 0, "").is_err());
        assert!(page_request(0, 0, MAX_PAGE_SIZE + 1, "").is_err());
        let e = page_request(0, 0, 0, "not base64!").unwrap_err();
        assert!(e.to_string().contains("next_page_token"), "{e}");
        let t = next_token(Some(&[1, 2, 3]));
        assert_eq!(
            page_request(0, 0, 1, &t).unwrap().after,
            Some(vec![1, 2, 3])
        );
        assert_eq!(next_token(None), "");
    }
}
