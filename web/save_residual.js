// Save Residual: show the saved file's name on the node once it has run. The web UI shows a node's text
// output only on its own Preview Any node, so without this the name reached the API's /history alone.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "personalized_residuals.SaveResidual",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "PersonalizedResidualSave") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.[0];
      if (!text) return;
      if (!this.savedWidget) {  // made on the first run, so saved workflows keep the schema's widgets
        this.savedWidget = ComfyWidgets.STRING(this, "saved", ["STRING", { multiline: true }], app).widget;
        this.savedWidget.element.readOnly = true;
        this.savedWidget.serialize = false;
      }
      this.savedWidget.value = text;
      const [width, height] = this.computeSize();
      this.setSize([Math.max(this.size[0], width), Math.max(this.size[1], height)]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
