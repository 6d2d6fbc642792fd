// What a person does to a VM: power and delete, as the CLI does them.

import { pathOf, request } from "./client";

export type VmAction = "start" | "stop" | "restart" | "delete";

export const RESTART_ANNOTATION = "flotilla.dev/restart-requested-at";

export async function act(project: string, name: string, action: VmAction): Promise<void> {
  const path = pathOf("virtualmachines", project, name);
  const patch = (body: unknown) => request("PATCH", path, body, "application/merge-patch+json");
  switch (action) {
    case "start":
      await patch({ spec: { powerState: "Running" } });
      break;
    case "stop":
      await patch({ spec: { powerState: "Stopped" } });
      break;
    case "restart":
      await patch({ metadata: { annotations: { [RESTART_ANNOTATION]: new Date().toISOString() } } });
      break;
    case "delete":
      await request("DELETE", path);
      break;
  }
}

/** Does `action` to every VM named, all at once; the failures, by VM. */
export async function actOnAll(project: string, names: string[], action: VmAction): Promise<[string, string][]> {
  const results = await Promise.allSettled(names.map((n) => act(project, n, action)));
  return results.flatMap((r, i) => (r.status === "rejected" ? [[names[i], String(r.reason?.message ?? r.reason)] as [string, string]] : []));
}
