//! Plain-text files: decoding (UTF-8, UTF-16 with a BOM, else Windows-1252, the superset of
//! Latin-1 that browsers use), the "is this text at all" check, and synthetic pages.

use encoding_rs::{Encoding, UTF_8, WINDOWS_1252};

use super::normalize::{clean_text, paginate};
use super::{DocKind, Document, DocumentError, Page, SYNTHETIC_PAGE_BYTES};

/// Share of control characters (other than tab, newline, CR, form feed) above which decoded
/// bytes are taken to be binary data rather than text.
const MAX_CONTROL_SHARE: f64 = 0.01;

/// Decodes `bytes` as text, or `None` when they look like binary data. A BOM wins (UTF-8 or
/// UTF-16), then valid UTF-8, then Windows-1252, which maps every byte, so the binary check
/// is what rejects garbage.
pub(crate) fn decode(bytes: &[u8]) -> Option<String> {
    let text = if let Some((encoding, bom_len)) = Encoding::for_bom(bytes) {
        let (text, _) = encoding.decode_without_bom_handling(&bytes[bom_len..]);
        text.into_owned()
    } else if let Some(text) = UTF_8.decode_without_bom_handling_and_without_replacement(bytes) {
        text.into_owned()
    } else {
        let (text, _) = WINDOWS_1252.decode_without_bom_handling(bytes);
        text.into_owned()
    };
    looks_like_text(&text).then_some(text)
}

fn looks_like_text(text: &str) -> bool {
    let mut total = 0usize;
    let mut control = 0usize;
    for c in text.chars() {
        total += 1;
        if c == '\0' {
            return false;
        }
        if c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\u{000C}') {
            control += 1;
        }
    }
    total > 0 && (control as f64) <= (total as f64) * MAX_CONTROL_SHARE
}

/// A plain-text document: normalised text cut into synthetic pages, no sections.
pub(crate) fn load(decoded: &str, shown: &str, title: String) -> Result<Document, DocumentError> {
    let text = clean_text(decoded);
    if text.is_empty() {
        return Err(DocumentError::Empty { path: shown.into() });
    }
    let pages = synthetic_pages(&text, "text");
    Ok(Document {
        title,
        kind: DocKind::Text,
        text,
        pages,
        sections: Vec::new(),
        notes: vec![format!(
            "pages are synthetic (about {SYNTHETIC_PAGE_BYTES} bytes each); the file has no page numbers"
        )],
        failed_pages: Vec::new(),
    })
}

/// Synthetic pages of about [`SYNTHETIC_PAGE_BYTES`] over the whole of `text`.
pub(crate) fn synthetic_pages(text: &str, extractor: &str) -> Vec<Page> {
    paginate(text, SYNTHETIC_PAGE_BYTES)
        .into_iter()
        .zip(1u32..)
        .map(|(text_range, number)| Page {
            number,
            text_range,
            synthetic: true,
            extractor: extractor.into(),
            warnings: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_utf8_utf16_and_latin1() {
        assert_eq!(
            decode("naïve café".as_bytes()).as_deref(),
            Some("naïve café")
        );
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend("Grüße".encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode(&utf16).as_deref(), Some("Grüße"));
        let mut utf16be = vec![0xFE, 0xFF];
        utf16be.extend("Ωmega".encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(decode(&utf16be).as_deref(), Some("Ωmega"));
        assert_eq!(
            decode(b"caf\xe9 \x93quoted\x94").as_deref(),
            Some("café “quoted”")
        );
        assert_eq!(decode(b"\xEF\xBB\xBFbom").as_deref(), Some("bom"));
    }

    #[test]
    fn binary_is_not_text() {
        assert_eq!(decode(b"\x7fELF\x02\x01\x01\0\0\0"), None);
        assert_eq!(decode(&[0x01; 64]), None);
        assert_eq!(decode(b""), None);
    }
}
