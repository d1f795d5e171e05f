//! WebDataset tar shards: listing a (possibly corrupt) tar, grouping members into samples, and
//! reading every member in place, as `prm attack --input 'x.tar'` does.
#![no_main]

use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prm::io::webdataset::{list_tar, open_member};

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| tempfile::tempdir().unwrap().keep().join("shard.tar"))
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).unwrap();
    let Ok((shard, _warnings)) = list_tar(p, "shard.tar") else {
        return;
    };
    for e in &shard.entries {
        assert!(!e.name.is_empty());
        // Member paths are used under the output directory: they must not climb out of it.
        assert!(!e.name.starts_with('/') && !e.name.split('/').any(|c| c == ".." || c.is_empty()));
        if let Ok(mut r) = open_member(p, e.offset, e.size) {
            let mut buf = Vec::new();
            let _ = r.by_ref().take(1 << 20).read_to_end(&mut buf);
            assert!(buf.len() as u64 <= e.size);
        }
    }
});
