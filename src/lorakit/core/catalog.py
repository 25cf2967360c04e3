# ruff: noqa: E501  (one catalog line per method, by design)
"""THE registry of methods: one line per method.

Each line is (axis, name, "module:Object", paper, arXiv id). Adding a method = one file in its axis
folder plus one line here. `lorakit methods` reads this table without importing the methods.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    axis: str
    name: str
    target: str  # "module:Object", imported lazily
    paper: str
    arxiv: str


AXES = ("form", "init", "strategy", "merge", "route", "retrieve", "federated", "serving", "generate", "ensemble",
        "diffusion", "train")

CATALOG: tuple[Entry, ...] = (
    Entry("form", "lora", "lorakit.forms.lora:LoRA", "LoRA: Low-Rank Adaptation of LLMs (Hu et al., 2021); rsLoRA (Kalajdzievski, 2023)", "2106.09685, 2312.03732"),
    Entry("form", "ffa", "lorakit.forms.lora:FFALoRA", "FFA-LoRA: Improving LoRA in Privacy-preserving Federated Fine-tuning (Sun et al., ICLR 2024)", "2403.12313"),
    # forms-group-A (dora, lora_xs, slora, nlora, inttune)
    Entry("form", "dora", "lorakit.forms.dora:DoRA", "DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024)", "2402.09353"),
    Entry("form", "lora_xs", "lorakit.forms.lora_xs:LoRAXS", "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., ECAI 2025)", "2405.17604"),
    Entry("form", "slora", "lorakit.forms.slora:SLoRA", "StructuredLoRA, in NLoRA: Nyström-Initiated Low-Rank Adaptation for LLMs (Guo et al., Findings of EMNLP 2025)", "2502.14482"),
    Entry("form", "nlora", "lorakit.forms.slora:NLoRA", "NLoRA: Nyström-Initiated Low-Rank Adaptation for LLMs (Guo et al., Findings of EMNLP 2025)", "2502.14482"),
    Entry("form", "inttune", "lorakit.forms.slora:IntTune", "IntermediateTune, in NLoRA: Nyström-Initiated Low-Rank Adaptation for LLMs (Guo et al., Findings of EMNLP 2025)", "2502.14482"),
    Entry("init", "nystrom", "lorakit.inits.nystrom:NystromInit", "Nyström init of NLoRA: A = W[:r,:], B = W[:,:r], N = W[:r,:r] or its pinv (Guo et al., Findings of EMNLP 2025)", "2502.14482"),
    # forms-group-B (dylora, loldu, block_lora)
    Entry("form", "dylora", "lorakit.forms.dylora:DyLoRA", "DyLoRA: Parameter-Efficient Tuning of Pretrained Models using Dynamic Search-Free Low-Rank Adaptation (Valipour et al., EACL 2023)", "2210.07558"),
    Entry("strategy", "dylora", "lorakit.strategies.dylora:DyLoRARankSampling", "DyLoRA rank sampling: b ~ U{1..r_max} per step, one rank model-wide (Valipour et al., EACL 2023)", "2210.07558"),
    # strategies issue 5 (allora, lora_pro, lisa, increlora)
    Entry("strategy", "allora", "lorakit.strategies.allora:ALLoRA", "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws (Huang & Balestriero, 2024)", "2410.09692"),
    Entry("strategy", "lora_pro", "lorakit.strategies.lora_pro:LoRAPro", "LoRA-Pro: Are Low-Rank Adapters Properly Optimized? (Wang & Liang, ICLR 2025)", "2407.18242"),
    Entry("strategy", "lisa", "lorakit.strategies.lisa:LISA", "LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning (Pan et al., NeurIPS 2024)", "2403.17919"),
    Entry("form", "increlora", "lorakit.forms.increlora:IncreLoRA", "IncreLoRA form: growing B·diag(E)·A with reserve ranks (Zhang et al., 2023)", "2308.12043"),
    Entry("strategy", "increlora", "lorakit.strategies.increlora:IncreLoRARankGrowth", "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning (Zhang et al., 2023)", "2308.12043"),
    Entry("strategy", "diffora", "lorakit.strategies.diffora:DiffoRA", "DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential Module Selection (Jiang, Wang & Yuan, 2025)", "2502.08905"),
    Entry("strategy", "loraprune", "lorakit.strategies.loraprune:LoRAPrune", "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning (Zhang et al., Findings of ACL 2024)", "2305.18403"),
    Entry("strategy", "loram", "lorakit.strategies.loram:LoRAM", "LoRAM: Train Small, Infer Large: Memory-Efficient LoRA Training for LLMs (Zhang et al., ICLR 2025)", "2502.13533"),
    # compose/merge (linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, lego, lorahub)
    Entry("merge", "linear", "lorakit.compose.merge.linear:LinearMerge", "Exact weighted sum of ΔW (task arithmetic: Editing Models with Task Arithmetic, Ilharco et al., ICLR 2023), optional rank-k SVD", "2212.04089"),
    Entry("merge", "cat", "lorakit.compose.merge.cat:CatMerge", "Concatenation of weighted factors, exact at rank Σr (PEFT's cat)", "-"),
    Entry("merge", "svd", "lorakit.compose.merge.svd:SVDMerge", "Best rank-k (Eckart–Young) truncation of the exact weighted sum (PEFT's svd)", "-"),
    Entry("merge", "ties", "lorakit.compose.merge.ties:TiesMerge", "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023), on ΔW, rank-k SVD", "2306.01708"),
    Entry("merge", "dare_linear", "lorakit.compose.merge.dare:DareLinearMerge", "DARE + sum: Language Models are Super Mario (Yu et al., ICML 2024), on ΔW, rank-k SVD", "2311.03099"),
    Entry("merge", "dare_ties", "lorakit.compose.merge.dare:DareTiesMerge", "DARE + TIES (Yu et al., ICML 2024; Yadav et al., NeurIPS 2023), on ΔW, rank-k SVD", "2311.03099, 2306.01708"),
    Entry("merge", "magnitude_prune", "lorakit.compose.merge.magnitude_prune:MagnitudePruneMerge", "Magnitude pruning of each ΔW, then sum, rank-k SVD (PEFT's magnitude_prune_svd)", "-"),
    Entry("merge", "lego", "lorakit.compose.merge.lego:LegoMerge", "LoRA-LEGO: Merging LoRAs like Playing LEGO via rank-wise clustering of Minimal Semantic Units (Zhao et al., ICLR 2025)", "2409.16167"),
    Entry("merge", "lorahub", "lorakit.compose.merge.lorahub:LoraHubMerge", "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition (Huang et al., COLM 2024); gradient-free weight search", "2307.13269"),
    # compose/route (meteora, lora_mixer, reclora) and compose/retrieve (autolora)
    Entry("route", "meteora", "lorakit.compose.route.meteora:MeteoRA", "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models (Xu, Lai, Huang, ICLR 2025); per-linear top-k gates, gate CE", "2405.13053"),
    Entry("route", "lora_mixer", "lorakit.compose.route.lora_mixer:LoRAMixer", "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing (Li et al., ICLR 2026)", "2507.00029"),
    Entry("route", "reclora", "lorakit.compose.route.reclora:RecLoRA", "RecLoRA: Lifelong Personalized Low-Rank Adaptation of LLMs for Recommendation (Zhu et al., 2024); per-user meta-LoRA mixture", "2408.03533"),
    Entry("retrieve", "autolora", "lorakit.compose.retrieve.autolora:AutoLoRARetriever", "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation (Li et al., 2025); weight-encoding retriever", "2508.02107"),
    Entry("form", "loldu", "lorakit.forms.loldu:LoLDU", "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning (Shi et al., 2024)", "2410.13618"),
    Entry("form", "block_lora", "lorakit.forms.block_lora:BlockLoRA", "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning (Zhou et al., 2025)", "2501.16720"),
    # forms-group-C (bone, miss, shira)
    Entry("form", "bone", "lorakit.forms.miss:Bone", "Bone: Block-Affine Adaptation of Large Language Models (Kang, 2024); PEFT MiSS init_weights='bat'", "2409.15371"),
    Entry("form", "miss", "lorakit.forms.miss:MiSS", "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing (Kang, 2024/2025)", "2409.15371"),
    Entry("form", "shira", "lorakit.forms.shira:Shira", "Sparse High Rank Adapters (Bhardwaj et al., NeurIPS 2024)", "2406.13175"),
    Entry("init", "shira_grad", "lorakit.inits.shira_masks:ShiraGradMask", "SHiRA-Grad mask: top-k accumulated abs(dL/dW) on calibration data (Bhardwaj et al., NeurIPS 2024)", "2406.13175"),
    Entry("init", "shira_snip", "lorakit.inits.shira_masks:ShiraSnipMask", "SHiRA-SNIP mask: top-k abs(W * dL/dW) on calibration data (Bhardwaj et al., NeurIPS 2024)", "2406.13175"),
    # forms-group-D (flylora, smora, nola)
    Entry("form", "flylora", "lorakit.forms.flylora:FlyLoRA", "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise Mixture-of-Experts (Zou et al., NeurIPS 2025)", "2510.08396"),
    Entry("form", "smora", "lorakit.forms.smora:SMoRA", "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning (Zhao et al., 2025)", "2501.15103"),
    Entry("form", "nola", "lorakit.forms.nola:NOLA", "NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani et al., ICLR 2024)", "2310.02556"),
    # forms-group-E (randlora)
    Entry("form", "randlora", "lorakit.forms.randlora:RandLoRA", "RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., ICLR 2025)", "2502.00987"),
    Entry("init", "default", "lorakit.inits.basic:DefaultInit", "The form's own paper initialization", "-"),
    Entry("init", "kaiming", "lorakit.inits.basic:KaimingInit", "LoRA default: A ~ Kaiming-uniform, B = 0 (Hu et al., 2021)", "2106.09685"),
    Entry("init", "pissa", "lorakit.inits.pissa:PiSSAInit", "PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs (Meng et al., NeurIPS 2024)", "2404.02948"),
    Entry("init", "gaussian", "lorakit.inits.basic:GaussianInit", "LoRA with A ~ N(0, 1/r), B = 0 (Hu et al., 2021)", "2106.09685"),
    Entry("init", "lora_ga", "lorakit.inits.lora_ga:LoRAGAInit", "LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al., NeurIPS 2024)", "2407.05000"),
    Entry("init", "lora_sb", "lorakit.inits.lora_sb:LoRASBInit", "LoRA-SB: Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning (Ponkshe et al., 2024)", "2411.19557"),
    Entry("init", "ldu", "lorakit.inits.ldu:LDUInit", "LDU init of LoRA with residual base, from LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition (Shi et al., 2024)", "2410.13618"),
    Entry("init", "eva", "lorakit.inits.eva:EVAInit", "EVA: One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation (Paischer et al., 2024)", "2410.07170"),
    # federated (issue 8): aggregators of client adapters
    Entry("federated", "fedavg", "lorakit.federated.fedavg:FedAvg", "FedAvg on LoRA factors / FedIT: Towards Building the Federated GPT: Federated Instruction Tuning (Zhang et al., ICASSP 2024)", "2305.05644, 1602.05629"),
    Entry("federated", "flora", "lorakit.federated.flora:FLoRA", "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations (Wang et al., NeurIPS 2024)", "2409.05976"),
    Entry("federated", "ffa", "lorakit.federated.ffa:FFA", "FFA-LoRA: Improving LoRA in Privacy-preserving Federated Learning (Sun et al., ICLR 2024)", "2403.12313"),
    Entry("federated", "lora_fair", "lorakit.federated.lora_fair:LoRAFAIR", "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement (Bian et al., ICCV 2025)", "2411.14961"),
    # serving (issue 7)
    Entry("serving", "s_lora", "lorakit.serving.bank:AdapterBank", "S-LoRA: Serving Thousands of Concurrent LoRA Adapters (Sheng et al., MLSys 2024), with Punica's SGMV (Chen et al., MLSys 2024)", "2311.03285, 2310.18547"),
    # generate (issue 14): adapters for a new task from a description, from a bank of trained checkpoints
    Entry("generate", "icm_lora", "lorakit.generate.icm_lora:ICMLoRA", "ICM-LoRA: In-Context Meta LoRA Generation (Shao et al., IJCAI 2025); multi-task conv1d CVAE", "2501.17635"),
    Entry("generate", "sg_lora", "lorakit.generate.sg_lora:SGLoRA", "SG-LoRA: Semantic-guided LoRA Parameters Generation (Li et al., CVPR 2026); CVAE with a parameter-space semantic prior", "2509.10535"),
    Entry("generate", "text_to_lora", "lorakit.generate.hypernet:TextToLoRA", "Text-to-LoRA: Instant Transformer Adaption (Charakorn et al., ICML 2025); hypernetwork peer baseline", "2506.06105"),
    Entry("generate", "trans_lora", "lorakit.transfer.pipeline:Transfer", "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning (Wang et al., NeurIPS 2024); target-model synthesis, discriminator or TiTok filter, label-string teacher, across tokenizers", "2405.17258"),
    # ensemble (issue 16): several adapters on one base as an ensemble
    Entry("ensemble", "window_cascade", "lorakit.ensemble.cascade:WindowCascade", "Window-Based Early-Exit Cascades for Uncertainty Estimation: When Deep Ensembles are More Efficient than Single Models (Xia & Bouganis, ICCV 2023)", "2303.08010"),
    Entry("ensemble", "neas", "lorakit.ensemble.neas:NEASSupernet", "NEAS: One-Shot Neural Ensemble Architecture Search by Diversity-Guided Search Space Shrinking (Chen et al., CVPR 2021); K LoRA paths over a shared-adapter trunk, rank-sliceable supernet, lorakit's diversity-shrinking formula", "2104.00597"),
    # train (issue 16): several adapter jobs through one frozen base
    Entry("train", "multijob", "lorakit.train.multijob:MultiJobTrainer", "LoRAFusion: Efficient LoRA Fine-Tuning for LLMs (Zhu et al., EuroSys 2026); mLoRA (Ye et al., VLDB 2025); per-job isolation, token-capped packing", "2510.00206, 2312.02515"),
    # diffusion (issue 15): multi-LoRA text-to-image composition on diffusers UNets
    Entry("diffusion", "merge", "lorakit.diffusion.composers:MergeComposer", "Multi-LoRA merge baseline: exact weighted ΔW sum (task arithmetic, Ilharco et al., ICLR 2023)", "2212.04089"),
    Entry("diffusion", "switch", "lorakit.diffusion.composers:SwitchComposer", "LoRA Switch, in Multi-LoRA Composition for Image Generation (Zhong et al., 2024)", "2402.16843"),
    Entry("diffusion", "composite", "lorakit.diffusion.composers:CompositeComposer", "LoRA Composite, in Multi-LoRA Composition for Image Generation (Zhong et al., 2024)", "2402.16843"),
    Entry("diffusion", "lorahub", "lorakit.diffusion.composers:LoraHubComposer", "LoraHub (Huang et al., COLM 2024) weight search on few-shot renders of the diffusion testbed", "2307.13269"),
    Entry("diffusion", "cmlora", "lorakit.diffusion.cmlora:CMLoRAComposer", "Cached Multi-LoRA Composition for Multi-Concept Image Generation (Zou et al., 2025)", "2502.04923"),
    Entry("diffusion", "clora", "lorakit.diffusion.clora:CLoRAComposer", "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models (Meral et al., ICCV 2025)", "2403.19776"),
    Entry("diffusion", "lora_composer", "lorakit.diffusion.lora_composer:LoRAComposerComposer", "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in Training-Free Diffusion Models (Yang et al., 2024)", "2403.11627"),
    Entry("diffusion", "autolora_fusion", "lorakit.diffusion.autolora_fusion:GatedFusion", "AutoLoRA fine-grained gated fusion (Li et al., 2025); per-layer gates trained, LoRAs frozen", "2508.02107"),
)  # fmt: skip
