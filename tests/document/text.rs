use slm_chat::document::DocKind;

use crate::util::{assert_clean_error, corpus, extract, load, temp_file};

#[test]
fn utf16_with_bom_loads() {
    let mut bytes = vec![0xFF, 0xFE];
    bytes.extend(
        "Größe “quoted”\r\nzweite Zeile\r\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes),
    );
    let (_dir, path) = temp_file("utf16.txt", &bytes);
    let doc = load(&path).expect("utf-16 loads");
    assert_eq!(doc.kind, DocKind::Text);
    assert_eq!(doc.text, "Größe “quoted”\nzweite Zeile");
    assert!(doc.pages.iter().all(|page| page.synthetic));
}

#[test]
fn latin1_loads() {
    let (_dir, path) = temp_file(
        "latin1.txt",
        b"Caf\xe9 cr\xe8me, na\xefve \xabguillemets\xbb\n",
    );
    let doc = load(&path).expect("latin-1 loads");
    assert_eq!(doc.text, "Café crème, naïve «guillemets»");
}

#[test]
fn a_book_gets_synthetic_pages_that_cover_it() {
    let doc = load(&corpus("books/pride_and_prejudice.txt")).expect("book loads");
    assert!(doc.pages.len() > 150, "{} pages", doc.pages.len());
    assert_eq!(doc.pages[0].text_range.start, 0);
    assert_eq!(
        doc.pages.last().map(|p| p.text_range.end),
        Some(doc.text.len())
    );
    for pair in doc.pages.windows(2) {
        assert_eq!(pair[0].text_range.end, pair[1].text_range.start);
        assert!(pair[0].text_range.len() <= 4500);
    }
    let offset = doc.text.find("Chapter 61").expect("last chapter");
    let page = doc.page_at(offset);
    assert!(doc.text[doc.pages[page as usize - 1].text_range.clone()].contains("Chapter 61"));
}

#[test]
fn bad_input_gives_one_line_and_a_code() {
    let (dir, empty) = temp_file("empty.txt", b"");
    assert_clean_error(&extract(&empty, false), &empty, "empty file", 4);
    let missing = dir.path().join("missing.txt");
    assert_clean_error(&extract(&missing, false), &missing, "no such file", 3);
    assert_clean_error(
        &extract(dir.path(), false),
        dir.path(),
        "is a directory, not a document",
        3,
    );
    let (_dir, garbage) = temp_file(
        "blob.bin",
        &[0u8, 159, 146, 150, 1, 2, 3, 0, 255, 254, 0, 7],
    );
    let message = "unsupported file type (not PDF, EPUB, Markdown or text)";
    assert_clean_error(&extract(&garbage, false), &garbage, message, 4);
    let (_dir, zip) = temp_file("archive.dat", b"PK\x03\x04not really a zip");
    assert_clean_error(&extract(&zip, false), &zip, message, 4);
}

#[test]
fn unknown_extension_that_is_text_loads_as_text() {
    let (_dir, path) = temp_file("README", b"hello\n\n\n\nworld  again\n");
    let doc = load(&path).expect("text");
    assert_eq!(doc.kind, DocKind::Text);
    assert_eq!(doc.text, "hello\n\nworld again");
}
