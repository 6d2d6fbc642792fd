import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// Served by the flotilla binary at /ui/ (crates/flotilla-server/src/ui.rs embeds dist/).
export default defineConfig({
  base: "/ui/",
  plugins: [react()],
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // noVNC uses top-level await.
    target: "es2022",
    // No source maps in the binary; the bundles are small and readable enough.
    sourcemap: false,
    chunkSizeWarningLimit: 600,
  },
});
