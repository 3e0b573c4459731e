//! Page sizes and opaque keyset page tokens. A page token names the list it belongs to, so
//! one list's token is refused by another instead of silently skipping rows.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::domain::{Error, Result};

const DEFAULT_PAGE_SIZE: u64 = 50;
const MAX_PAGE_SIZE: u64 = 200;

/// A validated page request: how many rows, starting after which cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Rows wanted.
    pub size: u64,
    /// The previous page's opaque token, empty for the first page.
    pub token: String,
}

impl Page {
    /// Parses `page_size` (0 = default) and keeps `page_token` for the list to decode.
    pub fn parse(page_size: i32, page_token: String) -> Result<Self> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > 0 && (n as u64) <= MAX_PAGE_SIZE => n as u64,
            _ => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be between 0 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})"),
                ));
            }
        };
        if page_token.len() > 1024 {
            return Err(Error::invalid("page_token", "at most 1024 bytes"));
        }
        Ok(Self {
            size,
            token: page_token,
        })
    }

    /// The cursor of a `list` page token, if any.
    pub fn cursor(&self, list: &str) -> Result<Option<String>> {
        if self.token.is_empty() {
            return Ok(None);
        }
        let bad = || {
            Error::invalid(
                "page_token",
                "is not a page token of this list; start again without one",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(&self.token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let cursor = text
            .strip_prefix(list)
            .and_then(|rest| rest.strip_prefix('\n'))
            .ok_or_else(bad)?;
        Ok(Some(cursor.to_owned()))
    }
}

/// The page token that continues `list` after `cursor`.
pub fn next_token(list: &str, cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{list}\n{cursor}"))
}

/// Splits a fetched `size + 1` rows into the page and whether more follow.
pub fn split_page<T>(mut rows: Vec<T>, size: u64) -> (Vec<T>, bool) {
    let more = rows.len() as u64 > size;
    rows.truncate(size as usize);
    (rows, more)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_and_are_bounded() {
        assert_eq!(Page::parse(0, String::new()).unwrap().size, 50);
        assert_eq!(Page::parse(200, String::new()).unwrap().size, 200);
        for bad in [-1, 201] {
            let err = Page::parse(bad, String::new()).unwrap_err();
            assert!(err.to_string().starts_with("page_size: "), "{err}");
        }
    }

    #[test]
    fn tokens_round_trip_and_belong_to_one_list() {
        let token = next_token("tokens", "123:abc");
        let page = Page::parse(10, token).unwrap();
        assert_eq!(page.cursor("tokens").unwrap().as_deref(), Some("123:abc"));
        assert!(page.cursor("members").is_err());
        assert!(
            Page::parse(10, "!!".into())
                .unwrap()
                .cursor("tokens")
                .is_err()
        );
    }
}
