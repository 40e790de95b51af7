//! Postgres refusing keepwarm's role is a configuration error, not an outage: the daemon stops
//! at start-up saying why, instead of retrying a refusal forever.

use super::Pg;
use crate::util::{KeepwarmProcess, TempDir};
use std::time::Duration;

/// A refusal is answered at once; retrying would never end.
const REFUSED_WITHIN: Duration = Duration::from_secs(30);

/// Starts keepwarm with `source` and returns its log once it has exited, failed.
fn refused(pg: &Pg, dir: &TempDir, source: &str) -> String {
    let config = pg
        .env
        .config()
        .source("postgres", source)
        .write(dir, "keepwarm.toml");
    let mut daemon = KeepwarmProcess::spawn(&["run", "--config", &config]);
    assert!(!daemon.wait_exit(REFUSED_WITHIN).success());
    daemon.log.join("\n")
}

#[tokio::test]
async fn a_role_without_privileges_or_a_missing_database_stops_the_daemon() {
    let pg = Pg::new("kw-pg-refused", "CREATE TABLE orders (id int PRIMARY KEY);").await;
    let dir = TempDir::new("kw-pg-refused");
    // A replication role without the CREATE privilege on the database (nor owning the table)
    // may not create the publication (42501).
    let role = format!("{}_role", pg.database);
    pg.client
        .batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION"))
        .await
        .unwrap();
    let source = pg.source("\"public.orders\"").replacen(
        "postgresql://postgres@",
        &format!("postgresql://{role}@"),
        1,
    );
    let log = refused(&pg, &dir, &source);
    assert!(log.contains("cannot create publication kw"), "{log}");
    assert!(log.contains("permission denied for database"), "{log}");
    assert!(!log.contains("will retry"), "{log}");

    // A database that does not exist (3D000).
    let source = pg.source("\"public.orders\"").replacen(
        &format!("/{}\"", pg.database),
        "/no_such_database\"",
        1,
    );
    assert!(source.contains("no_such_database"), "{source}");
    let log = refused(&pg, &dir, &source);
    assert!(log.contains("cannot connect to the database"), "{log}");
    assert!(
        log.contains("database \"no_such_database\" does not exist"),
        "{log}"
    );
}
