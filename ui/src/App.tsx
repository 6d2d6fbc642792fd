// The frame: sign-in, the project switcher, the navigation, and one view per URL.

import { lazy, Suspense, useEffect, useState } from "react";
import { useQuery, useQueryClient } from "@tanstack/react-query";
import { request, setToken, token, whenUnauthorized, GROUP } from "./api/client";
import { useWatchedList } from "./api/useWatchedList";
import { Link, match, navigate, useLocation } from "./router";
import { Login, finishOidcLogin } from "./pages/Login";
import { VmList } from "./pages/VmList";
import { VmDetail } from "./pages/VmDetail";
import { NodeList } from "./pages/NodeList";
import { ImageList } from "./pages/ImageList";
import { KindList } from "./pages/KindList";

// The wizard (and its YAML library) loads when someone creates a VM.
const CreateVm = lazy(() => import("./pages/CreateVm").then((m) => ({ default: m.CreateVm })));

export interface Resource {
  name: string;
  kind: string;
  namespaced: boolean;
}

/** The kinds this server serves (discovery), for the navigation and the generic lists. */
export function useResources() {
  return useQuery({
    queryKey: ["discovery"],
    queryFn: async () => {
      const answer = await request("GET", GROUP);
      return (answer.resources as Resource[]).filter((r) => !r.name.includes("/"));
    },
    staleTime: Infinity,
  });
}

const FIXED = ["virtualmachines", "nodes", "images", "leases", "projects"];

export function App() {
  const [signedIn, setSignedIn] = useState(!!token());
  const { path } = useLocation();
  const queries = useQueryClient();
  useEffect(() => {
    whenUnauthorized(() => {
      setToken(null);
      queries.clear();
      setSignedIn(false);
    });
  }, [queries]);
  if (path === "/callback") {
    return <Finish onDone={() => setSignedIn(true)} />;
  }
  if (!signedIn) {
    return <Login onSignedIn={() => setSignedIn(true)} />;
  }
  return <Shell path={path} onSignOut={() => { setToken(null); queries.clear(); setSignedIn(false); }} />;
}

function Finish({ onDone }: { onDone: () => void }) {
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    finishOidcLogin()
      .then(() => {
        onDone();
        navigate("/", true);
      })
      .catch((e) => setError(String(e.message ?? e)));
  }, [onDone]);
  return <div className="login">{error ? <div className="error" role="alert">{error}</div> : "Signing in…"}</div>;
}

function Shell({ path, onSignOut }: { path: string; onSignOut: () => void }) {
  const projects = useWatchedList("projects", null);
  const resources = useResources();
  const inProject = matchPrefix(path);
  const project = inProject?.project ?? localStorage.getItem("flotilla.project") ?? "default";
  useEffect(() => {
    localStorage.setItem("flotilla.project", project);
  }, [project]);
  useEffect(() => {
    if (path === "/" || path === "") navigate(`/p/${project}/virtualmachines`, true);
  }, [path, project]);
  const switchProject = (p: string) => {
    const rest = path.startsWith("/p/") ? path.split("/").slice(3, 4).join("/") : "virtualmachines";
    navigate(`/p/${p}/${rest || "virtualmachines"}`);
  };
  const others = (resources.data ?? []).filter((r) => !FIXED.includes(r.name));
  return (
    <div className="shell">
      <header>
        <Link to="/" className="brand">
          Flotilla
        </Link>
        <label className="project">
          Project
          <select aria-label="Project" value={project} onChange={(e) => switchProject(e.target.value)}>
            {(projects.data?.items ?? [{ metadata: { name: project } }]).map((p) => (
              <option key={p.metadata.name} value={p.metadata.name}>
                {p.metadata.name}
              </option>
            ))}
          </select>
        </label>
        <button type="button" className="signout" onClick={onSignOut}>
          Sign out
        </button>
      </header>
      <nav>
        <Link to={`/p/${project}/virtualmachines`} className={active(path, "virtualmachines")}>
          Virtual machines
        </Link>
        <Link to="/nodes" className={path.startsWith("/nodes") ? "active" : ""}>
          Nodes
        </Link>
        <Link to={`/p/${project}/images`} className={active(path, "images")}>
          Images
        </Link>
        {others.map((r) => (
          <Link
            key={r.name}
            to={r.namespaced ? `/p/${project}/${r.name}` : `/c/${r.name}`}
            className={active(path, r.name)}
          >
            {plural(r.kind)}
          </Link>
        ))}
        <Link to="/c/projects" className={active(path, "projects")}>
          Projects
        </Link>
      </nav>
      <main>
        <Route path={path} project={project} resources={resources.data ?? []} />
      </main>
    </div>
  );
}

function matchPrefix(path: string): Record<string, string> | null {
  const parts = path.split("/").filter(Boolean);
  return parts[0] === "p" && parts[1] ? { project: decodeURIComponent(parts[1]) } : null;
}

function active(path: string, plural: string): string {
  const parts = path.split("/").filter(Boolean);
  return parts[2] === plural || (parts[0] === "c" && parts[1] === plural) ? "active" : "";
}

function plural(kind: string): string {
  const words = kind.replace(/^VM(?=[A-Z])/, "VM ").replace(/([a-z])([A-Z])/g, "$1 $2");
  return words.endsWith("y") ? words.slice(0, -1) + "ies" : words.endsWith("s") ? words + "es" : words + "s";
}

function Route({ path, project, resources }: { path: string; project: string; resources: { name: string; kind: string; namespaced: boolean }[] }) {
  let m;
  if ((m = match("/p/:project/virtualmachines", path))) return <VmList project={m.project} />;
  if ((m = match("/p/:project/virtualmachines/new", path)))
    return (
      <Suspense fallback={<div className="loading">Loading…</div>}>
        <CreateVm project={m.project} />
      </Suspense>
    );
  if ((m = match("/p/:project/virtualmachines/:name", path)))
    return <VmDetail project={m.project} name={m.name} tab="overview" />;
  if ((m = match("/p/:project/virtualmachines/:name/:tab", path)))
    return <VmDetail project={m.project} name={m.name} tab={m.tab} />;
  if (match("/nodes", path)) return <NodeList />;
  if ((m = match("/nodes/:name", path))) return <NodeList selected={m.name} />;
  if ((m = match("/p/:project/images", path))) return <ImageList project={m.project} />;
  if ((m = match("/p/:project/:plural", path))) {
    const r = resources.find((x) => x.name === m!.plural);
    return <KindList plural={m.plural} kind={r?.kind ?? m.plural} project={m.project} />;
  }
  if ((m = match("/c/:plural", path))) {
    const r = resources.find((x) => x.name === m!.plural);
    return <KindList plural={m.plural} kind={r?.kind ?? m.plural} project={null} />;
  }
  return (
    <div className="empty">
      No such page. <Link to={`/p/${project}/virtualmachines`}>Virtual machines</Link>
    </div>
  );
}
