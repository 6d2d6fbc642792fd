// The create-VM wizard: basics, source and disk, network and access, then a review of the
// object as YAML. "Create and start" sets powerState. A refused create brings back the step
// holding the field the server named, with the values kept and its message beside the field.

import { useMemo, useState, type ReactNode } from "react";
import { stringify } from "yaml";
import { ApiError, pathOf, request } from "../api/client";
import { useWatchedList } from "../api/useWatchedList";
import { Link, navigate } from "../router";

interface Form {
  name: string;
  project: string;
  sizing: "class" | "custom";
  className: string;
  cpus: string;
  memory: string;
  source: "image" | "kernel";
  image: string;
  kernel: string;
  initrd: string;
  cmdline: string;
  rootDisk: string;
  networks: string[];
  sshKeys: string;
  userData: string;
  start: boolean;
}

const STEPS = ["Basics", "Source and disk", "Network and access", "Review"];

/** Which step and input show the server's complaint about a field path. */
const FIELDS: [string, keyof Form, number][] = [
  ["metadata.name", "name", 0],
  ["metadata.namespace", "project", 0],
  ["spec.class", "className", 0],
  ["spec.resources.cpus", "cpus", 0],
  ["spec.resources.memory", "memory", 0],
  ["spec.resources", "cpus", 0],
  ["spec.image", "image", 1],
  ["spec.boot.kernel", "kernel", 1],
  ["spec.boot.initrd", "initrd", 1],
  ["spec.boot.cmdline", "cmdline", 1],
  ["spec.boot", "kernel", 1],
  ["spec.rootDisk", "rootDisk", 1],
  ["spec.networks", "networks", 2],
  ["spec.sshAuthorizedKeys", "sshKeys", 2],
  ["spec.userData", "userData", 2],
];

export function toObject(f: Form) {
  const spec: Record<string, unknown> = { powerState: f.start ? "Running" : "Stopped" };
  if (f.sizing === "class") spec.class = f.className;
  else spec.resources = { cpus: Number(f.cpus), memory: f.memory };
  if (f.source === "image") spec.image = f.image;
  else {
    spec.boot = { kernel: f.kernel, ...(f.initrd ? { initrd: f.initrd } : {}), ...(f.cmdline ? { cmdline: f.cmdline } : {}) };
  }
  if (f.rootDisk) spec.rootDisk = { size: f.rootDisk };
  if (f.networks.length) spec.networks = f.networks.map((network) => ({ network }));
  const keys = f.sshKeys.split("\n").map((k) => k.trim()).filter(Boolean);
  if (keys.length) spec.sshAuthorizedKeys = keys;
  if (f.userData.trim()) spec.userData = f.userData;
  return {
    apiVersion: "flotilla.dev/v1alpha1",
    kind: "VirtualMachine",
    metadata: { name: f.name, namespace: f.project },
    spec,
  };
}

export function CreateVm({ project }: { project: string }) {
  const projects = useWatchedList("projects", null);
  const classes = useWatchedList("vmclasses", null);
  const [form, setForm] = useState<Form>({
    name: "",
    project,
    sizing: "custom",
    className: "",
    cpus: "1",
    memory: "1Gi",
    source: "image",
    image: "",
    kernel: "",
    initrd: "",
    cmdline: "console=ttyS0",
    rootDisk: "10Gi",
    networks: [],
    sshKeys: "",
    userData: "",
    start: true,
  });
  const images = useWatchedList("images", form.project);
  const networks = useWatchedList("networks", form.project);
  const [step, setStep] = useState(0);
  const [error, setError] = useState<ApiError | null>(null);
  const [busy, setBusy] = useState(false);
  const set = <K extends keyof Form>(key: K, value: Form[K]) => setForm((f) => ({ ...f, [key]: value }));
  const object = useMemo(() => toObject(form), [form]);

  const problems = useMemo(() => {
    const out: Partial<Record<keyof Form, string>> = {};
    for (const p of error?.fields ?? []) {
      const found = FIELDS.find(([path]) => p.field === path || p.field.startsWith(path + ".") || p.field.startsWith(path + "["));
      const key = found?.[1] ?? "name";
      out[key] = out[key] ? `${out[key]}; ${p.message}` : p.message;
    }
    return out;
  }, [error]);

  const submit = async () => {
    setBusy(true);
    setError(null);
    try {
      await request("POST", pathOf("virtualmachines", form.project), object);
      navigate(`/p/${form.project}/virtualmachines/${form.name}`);
    } catch (e) {
      const err = e instanceof ApiError ? e : new ApiError(0, "", String(e));
      setError(err);
      // Back to the step with the first field the server named (the form keeps its values).
      const first = err.fields[0]?.field ?? "";
      const found = FIELDS.find(([path]) => first === path || first.startsWith(path + ".") || first.startsWith(path + "["));
      if (found) setStep(found[2]);
      else if (/name/i.test(err.message) && err.code === 409) setStep(0);
    } finally {
      setBusy(false);
    }
  };

  const field = (key: keyof Form, label: string, input: ReactNode, hint?: string) => (
    <div className={`field ${problems[key] ? "invalid" : ""}`}>
      <label htmlFor={`vm-${key}`}>{label}</label>
      {input}
      {hint && <div className="hint">{hint}</div>}
      {problems[key] && (
        <div className="field-error" role="alert" data-field={key}>
          {problems[key]}
        </div>
      )}
    </div>
  );
  const text = (key: keyof Form, props: Record<string, unknown> = {}) => (
    <input id={`vm-${key}`} name={key} value={String(form[key])} onChange={(e) => set(key, e.target.value as never)} {...props} />
  );

  return (
    <section className="wizard">
      <div className="title">
        <h1>Create a virtual machine</h1>
        <Link to={`/p/${project}/virtualmachines`}>Cancel</Link>
      </div>
      <ol className="steps">
        {STEPS.map((s, i) => (
          <li key={s} className={i === step ? "active" : ""}>
            <button type="button" onClick={() => setStep(i)}>
              {i + 1}. {s}
            </button>
          </li>
        ))}
      </ol>
      {error && (
        <div className="error" role="alert">
          {error.message}
        </div>
      )}
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (step < STEPS.length - 1) setStep(step + 1);
          else submit();
        }}
      >
        {step === 0 && (
          <>
            {field("name", "Name", text("name", { required: true, placeholder: "web-1", autoFocus: true }), "Lowercase letters, digits and '-'; unique in the project.")}
            {field(
              "project",
              "Project",
              <select id="vm-project" value={form.project} onChange={(e) => set("project", e.target.value)}>
                {(projects.data?.items ?? [{ metadata: { name: project } }]).map((p) => (
                  <option key={p.metadata.name}>{p.metadata.name}</option>
                ))}
              </select>,
            )}
            <fieldset>
              <legend>Size</legend>
              <label>
                <input type="radio" name="sizing" checked={form.sizing === "class"} onChange={() => set("sizing", "class")} /> A class
              </label>
              <label>
                <input type="radio" name="sizing" checked={form.sizing === "custom"} onChange={() => set("sizing", "custom")} /> CPUs and memory
              </label>
            </fieldset>
            {form.sizing === "class"
              ? field(
                  "className",
                  "Class",
                  <select id="vm-className" value={form.className} onChange={(e) => set("className", e.target.value)}>
                    <option value="">choose…</option>
                    {(classes.data?.items ?? []).map((c) => (
                      <option key={c.metadata.name} value={c.metadata.name}>
                        {c.metadata.name} ({c.spec?.cpus} CPUs, {c.spec?.memory})
                      </option>
                    ))}
                  </select>,
                )
              : (
                <div className="row">
                  {field("cpus", "CPUs", text("cpus", { type: "number", min: 1 }))}
                  {field("memory", "Memory", text("memory", { placeholder: "1Gi" }), "As 512Mi, 2Gi…")}
                </div>
              )}
          </>
        )}
        {step === 1 && (
          <>
            <fieldset>
              <legend>Boot from</legend>
              <label>
                <input type="radio" name="source" checked={form.source === "image"} onChange={() => set("source", "image")} /> An image
              </label>
              <label>
                <input type="radio" name="source" checked={form.source === "kernel"} onChange={() => set("source", "kernel")} /> A kernel on the node
              </label>
            </fieldset>
            {form.source === "image"
              ? field(
                  "image",
                  "Image",
                  <select id="vm-image" value={form.image} onChange={(e) => set("image", e.target.value)}>
                    <option value="">choose…</option>
                    {(images.data?.items ?? []).map((i) => (
                      <option key={i.metadata.name}>{i.metadata.name}</option>
                    ))}
                  </select>,
                )
              : (
                <>
                  {field("kernel", "Kernel", text("kernel", { placeholder: "/var/lib/flotilla/guests/vmlinuz" }))}
                  {field("initrd", "Initrd", text("initrd"))}
                  {field("cmdline", "Kernel command line", text("cmdline"))}
                </>
              )}
            {field("rootDisk", "Root disk size", text("rootDisk", { placeholder: "10Gi" }), "Empty for no root disk.")}
          </>
        )}
        {step === 2 && (
          <>
            {field(
              "networks",
              "Networks",
              <div id="vm-networks" className="checks">
                {(networks.data?.items ?? []).length === 0 && <span className="hint">No networks in {form.project}.</span>}
                {(networks.data?.items ?? []).map((n) => (
                  <label key={n.metadata.name}>
                    <input
                      type="checkbox"
                      checked={form.networks.includes(n.metadata.name)}
                      onChange={(e) =>
                        set("networks", e.target.checked ? [...form.networks, n.metadata.name] : form.networks.filter((x) => x !== n.metadata.name))
                      }
                    />
                    {n.metadata.name}
                  </label>
                ))}
              </div>,
            )}
            {field("sshKeys", "SSH public keys", <textarea id="vm-sshKeys" rows={3} value={form.sshKeys} onChange={(e) => set("sshKeys", e.target.value)} />, "One per line.")}
            {field("userData", "User data (cloud-init)", <textarea id="vm-userData" rows={6} value={form.userData} onChange={(e) => set("userData", e.target.value)} placeholder="#cloud-config" />)}
          </>
        )}
        {step === 3 && (
          <>
            <p>This object is sent to the API:</p>
            <pre className="yaml" data-testid="yaml-preview">
              {stringify(object)}
            </pre>
            <label className="inline">
              <input type="checkbox" checked={form.start} onChange={(e) => set("start", e.target.checked)} /> Start it once created
            </label>
          </>
        )}
        <div className="buttons">
          {step > 0 && (
            <button type="button" onClick={() => setStep(step - 1)}>
              Back
            </button>
          )}
          {step < STEPS.length - 1 ? (
            <button type="submit" className="primary">
              Next
            </button>
          ) : (
            <button type="submit" className="primary" disabled={busy}>
              {form.start ? "Create and start" : "Create"}
            </button>
          )}
        </div>
      </form>
    </section>
  );
}
