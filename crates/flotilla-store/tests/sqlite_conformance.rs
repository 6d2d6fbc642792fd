//! The conformance suite against the embedded SQLite backend.

flotilla_store::conformance_suite!(flotilla_store::conformance::sqlite());

/// SQLite-specific: committed data survives reopening the database (the server's restart path).
#[tokio::test]
async fn data_and_revisions_survive_reopen() {
    use flotilla_store::{SqliteStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let rev = {
        let s = SqliteStore::open(&path).await.unwrap();
        s.put("/a", b"1".to_vec()).await.unwrap();
        s.put("/b", b"2".to_vec()).await.unwrap()
    };
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.current_revision().await.unwrap(), rev);
    assert_eq!(s.get("/b").await.unwrap().unwrap().value, b"2");
    assert_eq!(s.put("/c", b"3".to_vec()).await.unwrap(), rev + 1);
}
