use std::time::Duration;

use slm_chat::document::{self, DocKind, LoadOptions};

use crate::util::{assert_clean_error, corpus, exe, extract, extract_json, load, temp_file};

/// Page counts measured with `pdfinfo` (poppler-utils 22.12.0) on ../shared/corpus/pdf; they
/// also match the `pages` column of corpus/pdf/SOURCES.md.
const PDFINFO_PAGES: &[(&str, usize)] = &[
    ("arabic_habibi_cmap.pdf", 1),
    ("geotopo_german_lecture_notes.pdf", 117),
    ("latex_multicolumn.pdf", 3),
    ("pride_and_prejudice_enscript_290p.pdf", 290),
    ("resnet_arxiv_1512.03385.pdf", 12),
    ("think_python_2e.pdf", 244),
];

#[test]
fn page_counts_match_pdfinfo() {
    for &(name, pages) in PDFINFO_PAGES {
        let doc = extract_json(&corpus(&format!("pdf/{name}")));
        assert_eq!(doc["kind"], "pdf");
        let got = doc["pages"].as_array().expect("pages");
        assert_eq!(got.len(), pages, "{name}");
        let text_len = doc["text"].as_str().expect("text").len();
        let mut last_end = 0;
        for (i, page) in got.iter().enumerate() {
            assert_eq!(page["number"], i + 1, "{name}");
            assert_eq!(page["synthetic"], false);
            let start = page["text_range"]["start"].as_u64().expect("start") as usize;
            let end = page["text_range"]["end"].as_u64().expect("end") as usize;
            assert!(
                last_end <= start && start <= end && end <= text_len,
                "{name} page {}",
                i + 1
            );
            last_end = end;
        }
    }
}

#[test]
fn book_headers_go_and_pages_stay_mapped() {
    let doc = load(&corpus("pdf/pride_and_prejudice_enscript_290p.pdf")).expect("book loads");
    assert_eq!(doc.kind, DocKind::Pdf);
    assert!(
        !doc.text.contains("Jane Austen"),
        "running header left in the text"
    );
    assert!(!doc
        .text
        .lines()
        .any(|line| line.trim().starts_with("Page ")));
    let page = |n: usize| &doc.text[doc.pages[n - 1].text_range.clone()];
    assert!(page(1).starts_with("Chapter 1\nIt is a truth universally acknowledged"));
    // pdftotext puts "Chapter 61" on page 287; the mapping must agree.
    let offset = doc.text.find("Chapter 61").expect("last chapter");
    assert_eq!(doc.page_at(offset), 287);
    assert!(page(287).contains("Chapter 61"));
    assert!(doc.failed_pages.is_empty());
}

#[test]
fn ligatures_fold_in_a_latex_book() {
    let doc = load(&corpus("pdf/think_python_2e.pdf")).expect("book loads");
    assert!(!doc.text.contains('\u{FB01}') && !doc.text.contains('\u{FB02}'));
    assert!(doc.text.contains("first"));
}

#[test]
fn not_a_pdf_with_a_pdf_extension_is_one_clean_line() {
    let (_dir, path) = temp_file("notes.pdf", b"just some words, not a PDF\n");
    assert_clean_error(
        &extract(&path, false),
        &path,
        "not a PDF or damaged beyond reading",
        5,
    );
    let (_dir, path) = temp_file("cut.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catal");
    assert_clean_error(
        &extract(&path, true),
        &path,
        "not a PDF or damaged beyond reading",
        5,
    );
}

#[test]
fn torture_files_fail_cleanly_with_distinct_codes() {
    let cases = [
        (
            "pdf-torture/issue15590.pdf",
            "not a PDF or damaged beyond reading",
            5,
        ),
        ("pdf-torture/issue3371.pdf", "password required", 6),
        (
            "pdf-torture/IndexedCS_negative_and_high.pdf",
            "no text layer (the PDF looks scanned; OCR is not supported)",
            8,
        ),
    ];
    for (rel, message, code) in cases {
        let path = corpus(rel);
        assert_clean_error(&extract(&path, false), &path, message, code);
    }
}

#[test]
fn torture_files_that_panic_pdf_extract_still_give_text() {
    // pdf-extract panics on the predefined CMap (UniJIS-UCS2-H); lopdf keeps the Latin runs.
    let doc = load(&corpus("pdf-torture/issue6286.pdf")).expect("loads");
    assert!(doc.text.contains("Example"), "{:?}", doc.text);
    assert!(doc.pages[0]
        .warnings
        .iter()
        .any(|w| w.contains("pdf-extract panicked")));
    // A content stream lopdf rejects whole ("1e2 Tf") is repaired and read.
    let doc = load(&corpus("pdf-torture/sci-notation.pdf")).expect("loads");
    assert!(doc.text.contains("This line uses normal syntax"));
}

#[test]
fn a_worker_out_of_time_is_killed_and_reported() {
    let path = corpus("pdf/pride_and_prejudice_enscript_290p.pdf");
    let opts = LoadOptions {
        timeout: Duration::ZERO,
        ..LoadOptions::new(exe())
    };
    let err = document::load(&path, &opts).expect_err("no time at all");
    assert_eq!(err.exit_code(), 9);
    assert_eq!(
        err.to_string(),
        format!(
            "{}: text extraction failed (timed out after 0 s before the first page)",
            path.display()
        )
    );
}

#[test]
fn a_missing_worker_is_an_error_not_a_panic() {
    let path = corpus("pdf/latex_multicolumn.pdf");
    let opts = LoadOptions::new("/nonexistent/slm-chat-worker");
    let err = document::load(&path, &opts).expect_err("no worker");
    assert!(
        err.to_string().contains("cannot start the pdf worker"),
        "{err}"
    );
}

#[test]
fn plain_extract_prints_page_markers() {
    let run = extract(&corpus("pdf/latex_multicolumn.pdf"), false);
    assert_eq!(run.code, 0);
    assert!(run.stdout.starts_with("--- page 1 ---\n"));
    assert!(run.stdout.contains("\n--- page 3 ---\n"));
}

#[cfg(unix)]
/// Writes an executable stand-in for the worker that speaks the line protocol; `$4` is the
/// value of `--first-page`.
fn fake_worker(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-worker.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

const OPEN_3: &str =
    r#"echo '{"event":"open","pages":3,"encrypted":false,"title":"T","notes":[]}'"#;

fn page_line(n: u32) -> String {
    format!(
        r#"echo '{{"event":"page","number":{n},"text":"Text of page {n} with enough words.","extractor":"pdf-extract","failed":false,"warnings":[]}}'"#
    )
}

#[cfg(unix)]
#[test]
fn a_crashing_worker_is_restarted_after_the_bad_page() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = format!(
        "{OPEN_3}\nif [ \"$4\" = 1 ]; then {}; echo 'thread panicked' >&2; kill -ABRT $$; fi\n{}\necho '{{\"event\":\"done\"}}'",
        page_line(1),
        page_line(3)
    );
    let opts = LoadOptions::new(fake_worker(dir.path(), &script));
    let (_d, pdf) = temp_file("x.pdf", b"%PDF-1.4\n");
    let doc = document::load(&pdf, &opts).expect("partial document");
    assert_eq!(doc.pages.len(), 3);
    assert_eq!(doc.failed_pages, vec![2]);
    assert_eq!(doc.exit_code(), 10);
    assert!(doc.notes[0].starts_with("partial: text from 2 of 3 pages; failed pages: 2"));
    assert!(
        doc.pages[1].warnings[0].contains("crashed on this page"),
        "{:?}",
        doc.pages[1]
    );
    assert!(doc.text[doc.pages[2].text_range.clone()].starts_with("Text of page 3"));
}

#[cfg(unix)]
#[test]
fn a_hanging_worker_is_killed_and_its_pages_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = format!("{OPEN_3}\n{}\nexec sleep 30", page_line(1));
    let opts = LoadOptions {
        timeout: Duration::from_secs(1),
        ..LoadOptions::new(fake_worker(dir.path(), &script))
    };
    let (_d, pdf) = temp_file("x.pdf", b"%PDF-1.4\n");
    let doc = document::load(&pdf, &opts).expect("partial document");
    assert_eq!(doc.failed_pages, vec![2, 3]);
    assert!(doc.pages[2].warnings[0].contains("not reached within the 1 s time limit"));
    assert_eq!(doc.page_at(0), 1);
}
