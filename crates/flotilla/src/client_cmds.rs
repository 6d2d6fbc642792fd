//! The client verbs: apply, get, describe, delete, version.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, ValueEnum};
use flotilla_client::{Client, ClientError, ListParams};
use flotilla_types::clientconfig::Context;
use flotilla_types::registry::{self, KindInfo};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::config::{self, ConnectionArgs};
use crate::output::{self, Table};

#[derive(Args)]
pub struct ApplyArgs {
    /// A YAML/JSON file (several documents allowed), a directory of them, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Project for objects that do not name one.
    #[arg(short = 'p', long)]
    pub project: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Wide,
    Json,
    Yaml,
    Name,
}

#[derive(Args)]
pub struct GetArgs {
    /// Kind: vm, vms, virtualmachine, node, image, vmclass, project, ...
    pub kind: String,
    pub name: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Keep watching and print changes.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Label selector, e.g. app=web,tier!=db.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Field selector, e.g. spec.nodeName=node-1.
    #[arg(long)]
    pub field_selector: Option<String>,
    #[arg(short = 'p', long, conflicts_with = "all_projects")]
    pub project: Option<String>,
    /// List across all projects.
    #[arg(short = 'A', long)]
    pub all_projects: bool,
}

#[derive(Args)]
pub struct DescribeArgs {
    pub kind: String,
    pub name: String,
    #[arg(short = 'p', long)]
    pub project: Option<String>,
}

#[derive(Args)]
pub struct DeleteArgs {
    pub kind: String,
    pub name: String,
    #[arg(short = 'p', long)]
    pub project: Option<String>,
    /// Wait until the object is gone (its finalizers have run).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (e.g. 30s, 5m).
    #[arg(long, default_value = "5m", value_parser = crate::server_cmd::parse_duration)]
    pub timeout: std::time::Duration,
}

fn kind_of(name: &str) -> anyhow::Result<&'static KindInfo> {
    registry::lookup(name).ok_or_else(|| {
        let known: Vec<&str> = registry::KINDS.iter().map(|k| k.singular).collect();
        anyhow!("unknown kind {name:?}; known kinds: {}", known.join(", "))
    })
}

pub(crate) fn project<'a>(flag: &'a Option<String>, ctx: &'a Context) -> &'a str {
    flag.as_deref()
        .or(ctx.project.as_deref())
        .unwrap_or("default")
}

fn namespace_for<'a>(kind: &KindInfo, project: &'a str) -> Option<&'a str> {
    kind.namespaced.then_some(project)
}

pub async fn version(conn: &ConnectionArgs) -> anyhow::Result<()> {
    println!("Client: {}", env!("CARGO_PKG_VERSION"));
    match config::client(conn).await {
        Ok((client, _)) => {
            let v = client
                .request_json(reqwest::Method::GET, "/version", &[], None)
                .await?;
            println!(
                "Server: {} ({})",
                output::field(&v, "flotillaVersion"),
                output::field(&v, "apiVersion")
            );
            println!("Cluster: {}", output::field(&v, "clusterID"));
        }
        Err(e) => println!("Server: not configured ({e})"),
    }
    Ok(())
}

/// Reads documents from files, directories (their *.yaml, *.yml, *.json) or stdin.
fn read_documents(sources: &[String]) -> anyhow::Result<Vec<(String, Value)>> {
    let mut files: Vec<(String, String)> = Vec::new();
    for source in sources {
        if source == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
            files.push(("<stdin>".into(), text));
            continue;
        }
        let path = PathBuf::from(source);
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                .with_context(|| format!("cannot read directory {source}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            entries.sort();
            for p in entries {
                files.push((p.display().to_string(), read(&p)?));
            }
        } else {
            files.push((source.clone(), read(&path)?));
        }
    }
    let mut docs = Vec::new();
    for (name, text) in files {
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .with_context(|| format!("{name}: document {} is not valid YAML", i + 1))?;
            if !value.is_null() {
                docs.push((format!("{name} (document {})", i + 1), value));
            }
        }
    }
    Ok(docs)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

pub async fn apply(conn: &ConnectionArgs, args: ApplyArgs) -> anyhow::Result<()> {
    let docs = read_documents(&args.files)?;
    if docs.is_empty() {
        bail!("no objects found in {}", args.files.join(", "));
    }
    let (client, ctx) = config::client(conn).await?;
    let mut failures = 0;
    for (origin, doc) in docs {
        match apply_one(&client, &ctx, &args, &doc).await {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failures += 1;
                eprintln!("error: {origin}: {e:#}");
            }
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) could not be applied");
    }
    Ok(())
}

async fn apply_one(
    client: &Client,
    ctx: &Context,
    args: &ApplyArgs,
    doc: &Value,
) -> anyhow::Result<String> {
    let kind_name = doc["kind"]
        .as_str()
        .ok_or_else(|| anyhow!("the document has no kind"))?;
    let kind = registry::by_kind(kind_name).ok_or_else(|| anyhow!("unknown kind {kind_name:?}"))?;
    let name = doc["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("metadata.name is required"))?;
    let proj = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or(project(&args.project, ctx));
    let ns = namespace_for(kind, proj);
    let what = format!("{}/{name}", kind.singular);
    // Objects that their controllers and agents write often (a VM's status) may change between
    // the read and the write: read again and retry, for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let current = match client.get(kind, ns, name).await {
            Ok(v) => v,
            Err(e) if e.code() == Some(404) => {
                match client.create(kind, ns, &for_create(doc)).await {
                    Ok(_) => return Ok(format!("{what} created")),
                    Err(e) if e.code() == Some(409) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        // The file states the spec, labels and annotations; the rest stays as the server has it.
        let mut desired = current.clone();
        desired["spec"] = doc.get("spec").cloned().unwrap_or(json!({}));
        for key in ["labels", "annotations"] {
            match doc["metadata"].get(key) {
                Some(v) => desired["metadata"][key] = v.clone(),
                None => {
                    if let Some(m) = desired["metadata"].as_object_mut() {
                        m.remove(key);
                    }
                }
            }
        }
        match client.replace(kind, ns, name, &desired).await {
            Ok(after)
                if after["metadata"]["resourceVersion"]
                    == current["metadata"]["resourceVersion"] =>
            {
                return Ok(format!("{what} unchanged"))
            }
            Ok(_) => return Ok(format!("{what} configured")),
            Err(e) if e.code() == Some(409) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("{what} kept changing while being applied; try again")
}

/// A document as a create takes it: without what only the server sets (a file saved with
/// `get -o yaml` carries a resourceVersion, which a create refuses).
fn for_create(doc: &Value) -> Value {
    let mut doc = doc.clone();
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        for owned in flotilla_types::meta::SERVER_SET_FIELDS {
            meta.remove(owned);
        }
    }
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("status");
    }
    doc
}

fn print_objects(
    kind: &KindInfo,
    items: &[Value],
    format: OutputFormat,
    all: bool,
    headers: bool,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            let wide = format == OutputFormat::Wide;
            let mut t = Table::for_kind(kind, wide, all);
            t.rows = items
                .iter()
                .map(|o| Table::row(kind, o, wide, all))
                .collect();
            print!("{}", t.render(headers));
        }
        OutputFormat::Name => {
            for o in items {
                println!("{}/{}", kind.singular, output::field(o, "metadata.name"));
            }
        }
        OutputFormat::Json | OutputFormat::Yaml => unreachable!("handled by the caller"),
    }
    Ok(())
}

fn print_document(value: &Value, format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        _ => print!("---\n{}", serde_yaml::to_string(value)?),
    }
    Ok(())
}

pub async fn get(conn: &ConnectionArgs, args: GetArgs) -> anyhow::Result<()> {
    let kind = kind_of(&args.kind)?;
    let (client, ctx) = config::client(conn).await?;
    let all = args.all_projects && kind.namespaced;
    let proj = project(&args.project, &ctx).to_string();
    let ns = if all {
        None
    } else {
        namespace_for(kind, &proj)
    };
    let structured = matches!(args.output, OutputFormat::Json | OutputFormat::Yaml);
    let params = ListParams {
        label_selector: args.selector.clone(),
        field_selector: args.field_selector.clone(),
        ..Default::default()
    };
    let mut params = params;
    if let Some(name) = &args.name {
        if args.watch {
            params.field_selector = Some(format!("metadata.name={name}"));
        } else {
            let obj = client
                .get(kind, ns, name)
                .await
                .map_err(|e| not_found_hint(e, kind, &proj))?;
            return if structured {
                print_document(&obj, args.output)
            } else {
                print_objects(kind, &[obj], args.output, all, true)
            };
        }
    }
    if args.watch {
        let mut events = Box::pin(client.watch(kind, ns, &params, None).await?);
        let mut first = true;
        while let Some(ev) = events.next().await {
            let ev = ev?;
            match ev.type_.as_str() {
                "BOOKMARK" => continue,
                "ERROR" => bail!("the watch ended: {}", output::field(&ev.object, "message")),
                _ => {}
            }
            if structured {
                print_document(&json!({"type": ev.type_, "object": ev.object}), args.output)?;
            } else {
                print_objects(
                    kind,
                    std::slice::from_ref(&ev.object),
                    args.output,
                    all,
                    first,
                )?;
            }
            first = false;
        }
        return Ok(());
    }
    let list = client.list(kind, ns, &params).await?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    if structured {
        return print_document(&list, args.output);
    }
    if items.is_empty() {
        let place = if all || !kind.namespaced {
            String::new()
        } else {
            format!(" in project {proj}")
        };
        eprintln!("No {} found{place}.", kind.plural);
        return Ok(());
    }
    print_objects(kind, &items, args.output, all, true)
}

pub(crate) fn not_found_hint(e: ClientError, kind: &KindInfo, proj: &str) -> anyhow::Error {
    if e.code() == Some(404) && kind.namespaced {
        anyhow!("{e} (in project {proj}; use -p PROJECT or -A to look elsewhere)")
    } else {
        e.into()
    }
}

pub async fn describe(conn: &ConnectionArgs, args: DescribeArgs) -> anyhow::Result<()> {
    let kind = kind_of(&args.kind)?;
    let (client, ctx) = config::client(conn).await?;
    let proj = project(&args.project, &ctx).to_string();
    let obj = client
        .get(kind, namespace_for(kind, &proj), &args.name)
        .await
        .map_err(|e| not_found_hint(e, kind, &proj))?;
    print!("{}", output::describe(kind, &obj));
    if kind.kind != "Event" {
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        let events = registry::by_kind("Event").expect("registered");
        let params = ListParams {
            field_selector: Some(format!("involvedObject.uid={uid}")),
            ..Default::default()
        };
        // Events about cluster-scoped objects (nodes) are kept in the default project.
        let ns = if kind.namespaced {
            proj.as_str()
        } else {
            "default"
        };
        match client.list(events, Some(ns), &params).await {
            Ok(list) => print!(
                "{}",
                output::events_section(list["items"].as_array().map_or(&[][..], Vec::as_slice))
            ),
            Err(e) => println!("Events:       cannot be listed: {e}"),
        }
    }
    Ok(())
}

pub async fn delete(conn: &ConnectionArgs, args: DeleteArgs) -> anyhow::Result<()> {
    let kind = kind_of(&args.kind)?;
    let (client, ctx) = config::client(conn).await?;
    let proj = project(&args.project, &ctx).to_string();
    let ns = namespace_for(kind, &proj);
    let what = format!("{}/{}", kind.singular, args.name);
    let (obj, gone) = client
        .delete(kind, ns, &args.name)
        .await
        .map_err(|e| not_found_hint(e, kind, &proj))?;
    if gone {
        println!("{what} deleted");
        return Ok(());
    }
    if !args.wait {
        println!(
            "{what} is being deleted (waiting for finalizers: {})",
            output::field(&obj, "metadata.finalizers")
        );
        return Ok(());
    }
    let params = ListParams {
        field_selector: Some(format!("metadata.name={}", args.name)),
        ..Default::default()
    };
    let rv = obj["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    let wait = async {
        let mut events = Box::pin(client.watch(kind, ns, &params, rv.as_deref()).await?);
        while let Some(ev) = events.next().await {
            if ev?.type_ == "DELETED" {
                return Ok(());
            }
        }
        Err(anyhow!("the watch ended before {what} was deleted"))
    };
    tokio::time::timeout(args.timeout, wait)
        .await
        .map_err(|_| anyhow!("{what} is still being deleted after {:?}", args.timeout))??;
    println!("{what} deleted");
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mark a node unschedulable: no new VMs are placed on it (running ones stay).
    Cordon { name: String },
    /// Make a cordoned node schedulable again.
    Uncordon { name: String },
    /// Cordon a node and move every VM off it (live when running, cold when stopped); reports
    /// what could not move and why.
    Drain {
        name: String,
        /// Give up after this long: unfinished migrations are aborted (e.g. 10m).
        #[arg(long, default_value = "30m", value_parser = crate::server_cmd::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Print a join token for `flotilla agent --join-token`.
    Create {
        /// How long the token may be used (e.g. 30m, 24h).
        #[arg(long, default_value = "24h", value_parser = crate::server_cmd::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Set powerState to Running.
    Start(VmTarget),
    /// Set powerState to Stopped (graceful shutdown, then power off after a timeout).
    Stop(VmTarget),
    /// Restart a running VM.
    Restart(VmTarget),
    /// Take over an existing libvirt domain on a node (listed in the Node's unmanagedDomains)
    /// without disturbing it. Deleting the VM later releases the domain again.
    Adopt {
        node: String,
        /// The domain's name or UUID.
        domain: String,
        /// Name of the VM (default: derived from the domain's name).
        #[arg(long)]
        name: Option<String>,
        #[arg(short = 'p', long)]
        project: Option<String>,
    },
    /// Snapshot the VM: every disk, and its memory when it runs (a VMSnapshot).
    Snapshot {
        #[command(flatten)]
        target: VmTarget,
        /// The snapshot's name.
        snapshot: String,
        /// Disks only: a revert then boots the guest from them.
        #[arg(long)]
        no_memory: bool,
    },
    /// Revert the VM to one of its snapshots (with memory: the guest resumes where it was).
    Revert {
        #[command(flatten)]
        target: VmTarget,
        snapshot: String,
    },
    /// Move the VM to another node (a Migration): live by default, the guest keeps running.
    Migrate {
        #[command(flatten)]
        target: VmTarget,
        /// The node to move it to (default: the scheduler picks one).
        #[arg(long = "to")]
        to: Option<String>,
        /// Stop the VM, copy its disks, and start it on the target (for when live is impossible).
        #[arg(long)]
        cold: bool,
        /// Suspend the guest for the whole copy (always converges; the blackout is the copy).
        #[arg(long, conflicts_with = "cold")]
        suspend: bool,
        /// Return once the Migration is made, without waiting for its end.
        #[arg(long)]
        no_wait: bool,
    },
    /// Attach to the VM's serial console (interactive; Ctrl-] leaves).
    Console(VmTarget),
    /// Print the VM's serial console log.
    Log {
        #[command(flatten)]
        target: VmTarget,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

#[derive(Args)]
pub struct VmTarget {
    pub name: String,
    #[arg(short = 'p', long)]
    pub project: Option<String>,
}

pub async fn node(conn: &ConnectionArgs, cmd: NodeCommand) -> anyhow::Result<()> {
    let (client, _) = config::client(conn).await?;

    match cmd {
        NodeCommand::Token(TokenCommand::Create { ttl }) => {
            let body = serde_json::to_vec(&json!({"ttlSeconds": ttl.as_secs()}))?;
            let resp = client
                .request_json(
                    reqwest::Method::POST,
                    "/flotilla/v1/join-tokens",
                    &[],
                    Some(("application/json", body)),
                )
                .await?;
            println!("{}", output::field(&resp, "token"));
            eprintln!(
                "Valid until {}. On the new host: flotilla agent --server URL --join-token TOKEN",
                output::field(&resp, "expires")
            );
        }
        NodeCommand::Cordon { name } => set_unschedulable(&client, &name, true).await?,
        NodeCommand::Uncordon { name } => set_unschedulable(&client, &name, false).await?,
        NodeCommand::Drain { name, timeout } => {
            crate::drain_cmd::drain(&client, &name, timeout).await?
        }
    }
    Ok(())
}

async fn set_unschedulable(client: &Client, name: &str, unschedulable: bool) -> anyhow::Result<()> {
    let nodes = registry::by_kind("Node").expect("registered");
    // `null` removes the field, so an uncordoned node looks like one never cordoned.
    let value = if unschedulable {
        json!(true)
    } else {
        serde_json::Value::Null
    };
    client
        .patch(
            nodes,
            None,
            name,
            &json!({"spec": {"unschedulable": value}}),
            false,
        )
        .await?;
    println!(
        "node/{name} {}",
        if unschedulable {
            "cordoned"
        } else {
            "uncordoned"
        }
    );
    Ok(())
}

pub async fn vm(conn: &ConnectionArgs, cmd: VmCommand) -> anyhow::Result<()> {
    let (client, ctx) = config::client(conn).await?;
    let vms = registry::by_kind("VirtualMachine").expect("registered");
    if let VmCommand::Adopt {
        node,
        domain,
        name,
        project: p,
    } = cmd
    {
        let nodes = registry::by_kind("Node").expect("registered");
        let n = client.get(nodes, None, &node).await?;
        let found = n["status"]["unmanagedDomains"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["name"] == domain.as_str() || d["uuid"] == domain.as_str()).cloned())
            .ok_or_else(|| anyhow!("node {node} reports no unmanaged domain {domain:?}; see `flotilla get node {node} -o yaml`"))?;
        let name = name.unwrap_or_else(|| {
            flotilla_types::validation::to_dns_label(&output::field(&found, "name"), "adopted")
        });
        let proj = project(&p, &ctx).to_string();
        let vm = json!({"metadata": {"name": name, "annotations": {"flotilla.dev/adopted-domain-name": found["name"]}},
            "spec": {"nodeName": node, "adoptedDomain": found["uuid"],
                     "powerState": if found["running"] == true { "Running" } else { "Stopped" },
                     "resources": {"cpus": found["cpus"], "memory": found["memory"]}}});
        client.create(vms, Some(&proj), &vm).await?;
        println!(
            "virtualmachine/{name} adopted domain {} on {node}",
            output::field(&found, "name")
        );
        return Ok(());
    }
    if let VmCommand::Migrate {
        target,
        to,
        cold,
        suspend,
        no_wait,
    } = cmd
    {
        let proj = project(&target.project, &ctx).to_string();
        return migrate(&client, &proj, &target.name, to, cold, suspend, !no_wait).await;
    }
    if let VmCommand::Console(target) = cmd {
        let proj = project(&target.project, &ctx).to_string();
        return crate::console_cmd::run(&client, &proj, &target.name).await;
    }
    if let VmCommand::Log { target, follow } = cmd {
        let proj = project(&target.project, &ctx).to_string();
        let mut stream = Box::pin(
            client
                .vm_log(&proj, &target.name, follow)
                .await
                .map_err(|e| not_found_hint(e, vms, &proj))?,
        );
        let mut out = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            std::io::Write::write_all(&mut out, &chunk?)?;
            std::io::Write::flush(&mut out)?;
        }
        return Ok(());
    }
    let (target, patch, done) = match cmd {
        VmCommand::Start(t) => (
            t,
            json!({"spec": {"powerState": "Running"}}),
            "start requested",
        ),
        VmCommand::Stop(t) => (
            t,
            json!({"spec": {"powerState": "Stopped"}}),
            "stop requested",
        ),
        VmCommand::Restart(t) => {
            let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            (
                t,
                json!({"metadata": {"annotations": {flotilla_types::kinds::vm::RESTART_ANNOTATION: at}}}),
                "restart requested",
            )
        }
        VmCommand::Snapshot {
            target,
            snapshot,
            no_memory,
        } => {
            let proj = project(&target.project, &ctx).to_string();
            let kind = flotilla_types::registry::by_kind("VMSnapshot").expect("registered");
            let mut body = json!({"metadata": {"name": snapshot}, "spec": {"vm": target.name}});
            if no_memory {
                body["spec"]["memory"] = json!(false);
            }
            client.create(kind, Some(&proj), &body).await?;
            println!(
                "vmsnapshot/{snapshot} of virtualmachine/{} created",
                target.name
            );
            return Ok(());
        }
        VmCommand::Revert { target, snapshot } => {
            // A new value each time, so that reverting to the same snapshot again is a request.
            let request = format!("{snapshot} {}", flotilla_types::meta::now());
            let done = format!(
                "revert to {snapshot} requested (done when status.lastRevert says {request:?})"
            );
            let patch = json!({"metadata": {"annotations": {
                flotilla_types::kinds::volume_snapshot::REVERT_ANNOTATION: request}}});
            let proj = project(&target.project, &ctx).to_string();
            client
                .patch(vms, Some(&proj), &target.name, &patch, false)
                .await
                .map_err(|e| not_found_hint(e, vms, &proj))?;
            println!("virtualmachine/{} {done}", target.name);
            return Ok(());
        }
        VmCommand::Log { .. }
        | VmCommand::Adopt { .. }
        | VmCommand::Console(_)
        | VmCommand::Migrate { .. } => {
            unreachable!("handled above")
        }
    };
    let proj = project(&target.project, &ctx).to_string();
    client
        .patch(vms, Some(&proj), &target.name, &patch, false)
        .await
        .map_err(|e| not_found_hint(e, vms, &proj))?;
    println!("virtualmachine/{} {done}", target.name);
    Ok(())
}

/// Makes a Migration of `vm` and, with `wait`, follows it to its end (an error if it fails).
async fn migrate(
    client: &Client,
    project: &str,
    vm: &str,
    to: Option<String>,
    cold: bool,
    suspend: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let kind = registry::by_kind("Migration").expect("registered");
    let mut spec = json!({ "vm": vm });
    if let Some(to) = to {
        spec["targetNode"] = json!(to);
    }
    if cold {
        spec["mode"] = json!("Cold");
    }
    if suspend {
        spec["suspend"] = json!(true);
    }
    let made = client
        .create(
            kind,
            Some(project),
            &json!({"metadata": {"generateName": format!("{vm}-")}, "spec": spec}),
        )
        .await?;
    let name = output::field(&made, "metadata.name");
    println!("migration/{name} created");
    if !wait {
        return Ok(());
    }
    let mut said = String::new();
    loop {
        let m = client.get(kind, Some(project), &name).await?;
        let phase = output::field(&m, "status.phase");
        let line = match phase.as_str() {
            "Preparing" => format!(
                "preparing {} -> {}",
                output::field(&m, "status.sourceNode"),
                output::field(&m, "status.targetNode")
            ),
            "Migrating" => format!("copying ({} disks)", output::field(&m, "status.storage")),
            _ => String::new(),
        };
        if !line.is_empty() && line != said {
            println!("{line}");
            said = line;
        }
        match phase.as_str() {
            "Succeeded" => {
                println!(
                    "{vm} runs on {} (downtime {} ms, {} ms in all)",
                    output::field(&m, "status.targetNode"),
                    output::field(&m, "status.downtimeMs"),
                    output::field(&m, "status.durationMs")
                );
                return Ok(());
            }
            "Failed" | "Aborted" => {
                anyhow::bail!(
                    "migration/{name} {}: {}",
                    phase.to_lowercase(),
                    output::field(&m, "status.message")
                )
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
}
