"""CSS for the studio (Gradio 6 takes it at launch)."""

CSS = """
#studio-meter { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; }
.meter-row { display: flex; flex-wrap: wrap; gap: 18px; align-items: center; font-size: 14px; }
.meter-bar { width: 220px; height: 12px; background: var(--neutral-200); border-radius: 6px; overflow: hidden;
             position: relative; display: inline-block; vertical-align: middle; }
.meter-bar > .used { position: absolute; left: 0; top: 0; bottom: 0; background: #9ca3af; }
.meter-bar > .studio { position: absolute; left: 0; top: 0; bottom: 0; background: #f97316; }
.meter-bar > .budget { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #111827; }
.meter-note { color: var(--body-text-color-subdued); font-size: 13px; }
.job-progress { height: 10px; background: var(--neutral-200); border-radius: 5px; overflow: hidden; margin: 6px 0; }
.job-progress > div { height: 100%; background: #f97316; }
"""
