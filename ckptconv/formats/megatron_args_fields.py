"""Which fields of Megatron-LM's ``args`` the Megatron readers act on, as data.

Every field of Megatron-LM's argument parser (the lists, for ``core_v0.16.1`` and ``core_v0.19.0``,
are generated from ``megatron/training/arguments.py`` by ``fixtures/megatron_args/generate.py``;
a test walks both) is in exactly one table:

* ``MAPPED``: read by ``formats.megatron_args`` into the model config (or the parallel layout);
  the reader either represents the value or refuses it itself.
* ``REFUSED_UNLESS``: changes the function the checkpoint computes, and no reader maps it yet;
  a checkpoint whose args hold any value other than the listed ones is refused (exit 2, naming
  the field). Mapping a field = moving it from here to ``MAPPED`` in the same change that
  teaches ``megatron_args`` to read it.
* ``NEUTRAL``: cannot change the function of the weights (training, optimizer, parallelism
  and performance knobs, I/O, logging, tokenizer files, numerics of execution such as fp8 or
  fused kernels).

A field absent from a checkpoint's args is not checked (older Megatron-LM versions, hand-built
args); a field present but in none of the tables (a newer Megatron-LM) is not checked either —
regenerate the list and classify it.
"""
from __future__ import annotations

from typing import Any

from ..errors import UnsupportedFamily


def _names(text: str) -> frozenset[str]:
    """Whitespace-separated names; ``#`` starts a comment (the parser group they come from)."""
    return frozenset(w for line in text.splitlines() for w in line.partition("#")[0].split())


MAPPED = _names("""
    add_bias_linear add_qkv_bias decoder_first_pipeline_num_layers decoder_last_pipeline_num_layers
    ffn_hidden_size group_query_attention hidden_size kv_channels layernorm_epsilon
    max_position_embeddings norm_epsilon normalization num_attention_heads num_layers
    num_layers_per_virtual_pipeline_stage num_query_groups num_virtual_stages_per_pipeline_rank
    padded_vocab_size pipeline_model_parallel_size rope_scaling_factor rotary_base swiglu
    tensor_model_parallel_size transformer_impl untie_embeddings_and_output_weights use_rope_scaling
    virtual_pipeline_model_parallel_size vocab_size
    apply_layernorm_1p gated_linear_unit layernorm_zero_centered_gamma openai_gelu position_embedding_type
    qk_layernorm rotary_percent window_attn_skip_freq window_size
    num_experts moe_router_topk moe_ffn_hidden_size moe_router_pre_softmax moe_layer_freq
    moe_shared_expert_intermediate_size moe_shared_expert_gate
""")

# field -> the values the readers' assumptions hold for (Megatron-LM's default unless noted)
REFUSED_UNLESS: dict[str, tuple] = {
    'account_for_embedding_in_pipeline_split': (False,), 'account_for_loss_in_pipeline_split': (False,),
    'activation_func_clamp_value': (None,), 'apply_query_key_layer_scaling': (False,),
    'apply_residual_connection_post_layernorm': (False,), 'attention_output_gate': (False,),
    'decoder_num_layers': (None,), 'dsa_indexer_head_dim': (None,), 'dsa_indexer_n_heads': (None,),
    'dsa_indexer_topk': (None,), 'encoder_num_layers': (None,), 'experimental_attention_variant': (None,),
    'glu_linear_offset': (0.0,), 'heterogeneous_layers_config_encoded_json': (None,),
    'heterogeneous_layers_config_path': (None,), 'hybrid_attention_ratio': (0.0,),
    'hybrid_mlp_ratio': (0.0,), 'hybrid_override_pattern': (None,), 'is_hybrid_model': (False,),
    'kv_lora_rank': (32,), 'linear_attention_freq': (None,), 'linear_conv_kernel_dim': (4,),
    'linear_key_head_dim': (128,), 'linear_num_key_heads': (16,), 'linear_num_value_heads': (32,),
    'linear_value_head_dim': (128,), 'mamba_head_dim': (64,), 'mamba_num_groups': (8,),
    'mamba_num_heads': (None,), 'mamba_state_dim': (128,), 'moe_apply_probs_on_input': (False,),
    'moe_expert_capacity_factor': (None,), 'moe_input_jitter_eps': (None,), 'moe_latent_size': (None,),
    'moe_pad_expert_input_to_capacity': (False,), 'moe_router_dtype': (None,),
    'moe_router_enable_expert_bias': (False,), 'moe_router_group_topk': (None,),
    'moe_router_num_groups': (None,), 'moe_router_score_function': ('softmax',),
    'moe_router_topk_scaling_factor': (None,), 'moe_token_drop_policy': ('probs',),
    'mrope_section': (None,), 'mscale': (1.0,), 'mscale_all_dim': (0.0,), 'mtp_num_layers': (None,),
    'multi_latent_attention': (False,), 'no_rope_freq': (None,), 'num_experts_per_tok': (None,),
    'pipeline_model_parallel_layout': (None,), 'q_lora_rank': (None,), 'qk_head_dim': (128,),
    'qk_l2_norm': (False,), 'qk_pos_emb_head_dim': (64,), 'quick_geglu': (False,),
    'rope_type': (None, 'rope'), 'rotary_interleaved': (False,), 'rotary_scaling_factor': (1.0,),
    'rotary_seq_len_interpolation_factor': (None,), 'softmax_type': ('vanilla',), 'spec': (None,),
    'squared_relu': (False,), 'use_fused_weighted_squared_relu': (False,), 'use_legacy_models': (False,),
    'v_head_dim': (128,),
    # added by Megatron-LM core_v0.19 (0.16.1 has none of these)
    'dsa_indexer_k_norm_epsilon': (None,), 'dsa_indexer_k_norm_fp32': (False,),
    'dsa_indexer_rope_interleaved': (False,), 'dsa_indexer_rotate_activation': (True,),
    'dsa_indexer_scoring_relu': (True,), 'dsa_indexer_skip_topk_offset': (0,), 'dsa_indexer_topk_freq': (1,),
    'expert_gtp_weight_remat_size': (1,), 'gtp_weight_remat_size': (1,),   # weights sharded past TP
    'hybrid_layer_pattern': (None,), 'mla_down_proj_fusion': (False,),
    'moe_expert_rank_capacity_factor': (None,), 'moe_mlp_glu_interleave_size': (None,),
    'moe_router_force_biased': (None,), 'moe_shared_expert_glu_interleave_size': (None,),
    'moe_single_grouped_bias': (False,), 'moe_single_grouped_weight': (False,),
    'mtp_hybrid_override_pattern': (None,), 'mtp_use_repeated_layer': (False,),
    'mup_attn_scale_power': (1.0,), 'mup_base_head_dim': (None,), 'mup_base_hidden_size': (None,),
    'mup_embedding_mult': (1.0,), 'mup_output_mult': (1.0,), 'mup_width_mult': (1.0,), 'use_mup': (False,),
    'use_grouped_gemm_for_dense_mlp': (False,), 'use_grouped_gemm_for_shared_expert': (False,),
    'use_transformer_engine_op_fuser': (False,),   # module / weight layouts the readers do not know
    'yarn_beta_fast': (None,), 'yarn_beta_slow': (None,), 'yarn_correction_range_round_to_int': (None,),
    'yarn_original_max_position_embeddings': (None,),
    # a routing rule, not only a loss (was NEUTRAL): at inference sinkhorn weights experts by
    # sigmoid (top-1) / unnormalised softmax, quantile_balancing selects on logits - qb_beta
    'moe_router_load_balancing_type': ('aux_loss', 'seq_aux_loss', 'global_aux_loss', 'none', ['aux_loss'],
                                       ['seq_aux_loss'], ['global_aux_loss'], ['none']),
}

NEUTRAL = _names("""
    # In-process restart
    inprocess_active_world_size inprocess_barrier_timeout inprocess_completion_timeout
    inprocess_empty_cuda_cache inprocess_granularity inprocess_hard_timeout inprocess_heartbeat_interval
    inprocess_heartbeat_timeout inprocess_last_call_wait inprocess_max_iterations
    inprocess_monitor_process_interval inprocess_monitor_thread_interval
    inprocess_progress_watchdog_interval inprocess_restart inprocess_soft_timeout
    inprocess_termination_grace_time
    # RNG and initialization
    data_parallel_random_init inference_rng_tracker init_method_xavier_uniform seed te_rng_tracker
    # Transformer-Engine
    fp8_param_gather te_precision_config_file
    # autoresume
    adlr_autoresume adlr_autoresume_interval
    # biencoder
    bert_load biencoder_projection_dim biencoder_shared_query_context_model block_data_path
    embedding_path evidence_data_path ict_head_size ict_load indexer_batch_size indexer_log_interval
    query_in_block_prob retriever_report_topk_accuracies retriever_score_scaling titles_data_path
    use_one_sent_docs
    # checkpointing
    async_save auto_detect_ckpt_format ckpt_assume_constant_structure ckpt_convert_format
    ckpt_convert_save ckpt_convert_update_legacy_dist_opt_format ckpt_format ckpt_fully_parallel_load
    ckpt_fully_parallel_save ckpt_fully_parallel_save_deprecated ckpt_step dist_ckpt_format_deprecated
    dist_ckpt_optim_fully_reshardable dist_ckpt_save_pre_mcore_014 dist_ckpt_strictness
    distrib_optim_fully_reshardable_mem_efficient exit_on_missing_checkpoint finetune load
    load_main_params_from_ckpt no_load_optim no_load_rng no_save_optim no_save_rng
    non_persistent_ckpt_type non_persistent_global_ckpt_dir non_persistent_local_ckpt_algo
    non_persistent_local_ckpt_dir non_persistent_save_interval pretrained_checkpoint replication
    replication_factor replication_jump save save_dgrads_interval save_interval save_retain_interval
    save_wgrads_interval strict_fsdp_dtensor_load use_checkpoint_args use_dist_ckpt use_dist_ckpt_deprecated
    use_mp_args_from_checkpoint_args use_persistent_ckpt_worker use_tokenizer_model_from_checkpoint_args
    # data and dataloader
    allow_ambiguous_pad_tokens create_attention_mask_in_dataloader data_args_path data_cache_path
    data_path dataloader_defer_npy_index_mmap dataloader_fast_cache_load decoder_seq_length
    encoder_seq_length eod_mask_loss fim_data fim_eod_token fim_fragment_rate fim_middle_token
    fim_no_prefix fim_pad_token fim_prefix_token fim_rate fim_split_sample fim_spm_rate fim_suffix_token
    mask_prob mid_level_dataset_surplus mmap_bin_files mock_data num_dataset_builder_threads num_workers
    object_storage_cache_path per_dataset_sequences_path per_split_data_args_path
    phase_transition_iterations reset_attention_mask reset_position_ids sample_rate seq_length
    short_seq_prob split test_data_path train_data_path valid_data_path
    # distributed
    align_grad_reduce align_param_gather cp_comm_type create_all_gather_group
    data_parallel_sharding_strategy ddp_average_in_collective ddp_bucket_size ddp_num_buckets
    ddp_pad_buckets_for_high_nccl_busbw ddp_reduce_scatter_with_fp32_accumulation
    disable_symmetric_registration distributed_backend distributed_timeout_minutes
    distributed_timeout_seconds_after_init enable_full_sharding_in_hsdp fake_process_group
    fsdp_double_buffer fsdp_manual_registration gradient_reduce_div_fusion keep_fp8_transpose_cache
    lazy_mpu_init local_rank model_parallel_size nccl_communicator_config_path nccl_ub
    num_distributed_optimizer_instances outer_dp_sharding_strategy overlap_grad_reduce overlap_p2p_comm
    overlap_param_gather overlap_param_gather_with_optimizer_step scatter_gather_tensors_in_pipeline
    sharp_enabled_group suggested_communication_unit_size torch_fsdp2_reshard_after_forward
    use_distributed_optimizer use_megatron_fsdp use_sharp use_torch_fsdp2 use_tp_pp_dp_mapping
    # experimental
    enable_experimental exp_avg_dtype exp_avg_sq_dtype main_grads_dtype main_params_dtype
    use_precision_aware_optimizer yaml_cfg
    # ft_package
    calc_ft_timeouts enable_ft_package ft_num_warmup_iters
    # inference
    bert_embedder_type cuda_graph_scope decode_only_cuda_graphs disable_chunked_prefill
    inference_batch_times_seqlen_threshold inference_coordinator_port inference_dynamic_batching
    inference_dynamic_batching_block_size inference_dynamic_batching_buffer_size_gb
    inference_dynamic_batching_cuda_graph_max_tokens
    inference_dynamic_batching_cuda_graph_mixed_prefill_count inference_dynamic_batching_max_requests
    inference_dynamic_batching_max_tokens inference_dynamic_batching_num_cuda_graphs
    inference_dynamic_batching_paused_buffer_size_gb
    inference_dynamic_batching_track_paused_request_events
    inference_dynamic_batching_unified_memory_level inference_logging_step_interval
    inference_max_batch_size inference_max_seq_length inference_wandb_logging max_tokens_to_oom
    nccl_all_reduce_for_prefill output_bert_embeddings use_legacy_static_engine
    # learning rate and weight decay
    decoupled_lr decoupled_min_lr end_weight_decay lr lr_decay_iters lr_decay_samples lr_decay_style
    lr_warmup_fraction lr_warmup_init lr_warmup_iters lr_warmup_samples lr_wsd_decay_iters
    lr_wsd_decay_samples lr_wsd_decay_style min_lr override_opt_param_scheduler start_weight_decay
    use_checkpoint_opt_param_scheduler warmup weight_decay_incr_style
    # logging
    barrier_with_L1_time log_device_memory_used log_energy log_interval log_loss_scale_to_tensorboard
    log_max_attention_logit log_memory_interval log_memory_to_tensorboard log_num_zeros_in_grad
    log_params_norm log_progress log_throughput log_timers_to_tensorboard
    log_validation_ppl_to_tensorboard log_world_size_to_tensorboard logging_level tensorboard_dir
    tensorboard_log_interval tensorboard_queue_size timing_log_level timing_log_option wandb_entity
    wandb_exp_name wandb_project wandb_save_dir
    # mixed precision
    accumulate_allreduce_grads_in_fp32 attention_softmax_in_fp32 fp16_lm_cross_entropy
    grad_reduce_in_bf16 hysteresis initial_loss_scale loss_scale loss_scale_window min_loss_scale
    reuse_grad_buf_for_mxfp8_param_ag
    # mla
    cache_mla_latents
    # moe
    moe_aux_loss_coeff moe_pad_experts_for_cuda_graph_inference
    moe_upcycling_granularity moe_use_upcycling
    # msc
    enable_msc
    # network size
    add_position_embedding bert_binary_head make_vocab_size_divisible_by onnx_safe
    relative_attention_max_distance relative_attention_num_buckets use_rotary_position_embeddings
    # one logger
    app_tag_run_name app_tag_run_version enable_one_logger one_logger_async one_logger_project
    one_logger_run_name
    # profiling
    memory_snapshot_path profile profile_ranks profile_step_end profile_step_start record_memory_history
    use_pytorch_profiler
    # regularization
    adam_beta1 adam_beta2 adam_eps apply_wd_to_qk_layernorm clip_grad muon_extra_scale_factor
    muon_fp32_matmul_prec muon_momentum muon_num_ns_steps muon_scale_mode muon_split_qkv muon_tp_mode
    muon_use_nesterov no_weight_decay_cond_type sgd_momentum weight_decay
    # rerun engine
    check_for_spiky_loss error_injection_rate error_injection_type rerun_mode
    # rl
    grpo_clamp_eps_lower grpo_clamp_eps_upper grpo_entropy_term_weight
    grpo_filter_groups_with_same_reward grpo_group_size grpo_iterations grpo_kl_beta
    grpo_prompts_per_step langrl_env_config langrl_external_server
    langrl_inference_server_conversation_template langrl_inference_server_type perform_rl_step
    refit_method rl_default_temperature rl_default_top_k rl_default_top_p
    rl_importance_sampling_truncation_coef rl_inference_expert_model_parallel_size
    rl_inference_expert_tensor_model_parallel_size rl_inference_logprobs_is_correction
    rl_inference_model_unified_memory_level rl_inference_pipeline_model_parallel_size
    rl_inference_tensor_model_parallel_size rl_offload_inference_model_weights_when_idle
    rl_offload_kv_cache_during_training rl_offload_optimizer_during_inference
    rl_parallel_generation_tasks rl_partial_rollouts rl_prompts_per_eval
    rl_remove_kv_cache_during_training rl_reset_cuda_graphs rl_sequence_packing_algo
    rl_sequence_packing_max_sequences_per_bin rl_skip_bos_token rl_training_cuda_graphs
    rl_use_sequence_packing rl_verify_model_weights_swap
    # sft
    sft sft_tokenizer_prompt_format
    # straggler
    disable_straggler_on_startup log_straggler straggler_ctrlr_port straggler_minmax_count
    # tokenizer
    legacy_tokenizer merge_file tiktoken_num_special_tokens tiktoken_pattern tiktoken_special_tokens
    tokenizer_hf_include_special_tokens tokenizer_hf_use_fast tokenizer_metadata tokenizer_model
    tokenizer_sentencepiece_legacy tokenizer_special_tokens tokenizer_type trust_remote_code
    vocab_extra_ids vocab_file
    # training
    apply_rope_fusion batch_size bias_dropout_fusion bias_gelu_fusion bias_swiglu_fusion
    check_for_large_grads check_for_nan_in_loss_and_grad check_weight_hash_across_dp_replicas_interval
    checkpoint_activations dataloader_type decrease_batch_size_if_needed deprecated_use_mcore_models
    disable_jit_fuser dump_param_to_param_group_map empty_unused_memory_level enable_gloo_process_groups
    exit_duration_in_mins exit_interval exit_signal exit_signal_handler
    exit_signal_handler_for_dataloader global_batch_size gradient_accumulation_fusion
    high_priority_stream_groups iterations_to_skip manual_gc manual_gc_eval manual_gc_interval
    masked_softmax_fusion micro_batch_size no_persist_layer_norm optimizer optimizer_cpu_offload
    optimizer_offload_fraction overlap_cpu_optimizer_d2h_h2d pin_cpu_grads pin_cpu_params
    rampup_batch_size recompute_activations result_rejected_tracker_filename tp_comm_overlap_cfg
    train_iters train_samples train_sync_interval use_flash_attn use_torch_optimizer_for_cpu_offload
    # transformer configuration
    async_tensor_model_parallel_allreduce attention_backend attention_dropout batch_invariant_mode bf16
    calculate_per_token_loss clone_scatter_output_in_embedding config_logger_dir context_parallel_size
    cpu_offloading_num_layers cross_entropy_fusion_impl cross_entropy_loss_fusion cuda_graph_impl
    cuda_graph_warmup_steps defer_embedding_wgrad_compute delay_wgrad_compute deterministic_mode
    disable_bf16_reduced_precision_matmul distribute_saved_activations dsa_indexer_loss_coeff
    dsa_indexer_use_sparse_loss embedding_init_method_std enable_cuda_graph
    ep_overlap_early_attn_memory_release expert_model_parallel_size expert_tensor_parallel_size
    external_cuda_graph fine_grained_activation_offloading first_last_layers_bf16 flash_decode fp16
    fp32_residual_connection fp4 fp4_param fp4_quantizer_factory fp4_recipe fp8 fp8_amax_compute_algo
    fp8_amax_history_len fp8_interval fp8_margin fp8_quantizer_factory fp8_recipe fp8_wgrad
    hidden_dropout hierarchical_context_parallel_sizes hybrid_context_parallel
    inference_fuse_tp_communication init_method_std init_model_with_meta_device
    kitchen_attention_backend max_seqlen_per_dp_cp_rank microbatch_group_size_per_vp_stage
    min_offloaded_tensor_size mlp_chunks_for_prefill moe_deepep_num_sms moe_enable_deepep
    moe_enable_routing_replay moe_extended_tp moe_flex_dispatcher_backend moe_grouped_gemm
    moe_hybridep_num_sms moe_layer_recompute moe_per_layer_logging moe_permute_fusion
    moe_router_bias_update_rate moe_router_force_load_balancing moe_router_fusion
    moe_router_padding_for_fp8 moe_router_padding_for_quantization moe_shared_expert_overlap
    moe_token_dispatcher_type moe_use_legacy_grouped_gemm moe_z_loss_coeff mtp_loss_scaling_factor
    mtp_standalone num_layers_at_end_in_bf16 num_layers_at_start_in_bf16 offload_modules
    overlap_moe_expert_parallel_comm overlap_p2p_comm_warmup_flush perform_initialization
    pipeline_model_parallel_comm_backend qk_clip qk_clip_alpha qk_clip_threshold recompute_granularity
    recompute_method recompute_modules recompute_num_layers sequence_parallel symmetric_ar_type
    tp_comm_bootstrap_backend tp_comm_bulk_dgrad tp_comm_bulk_wgrad tp_comm_overlap tp_comm_overlap_ag
    tp_comm_overlap_rs tp_comm_overlap_rs_dgrad tp_comm_split_ag tp_comm_split_rs use_cpu_initialization
    use_kitchen_attention use_mamba_mem_eff_path use_ring_exchange_p2p use_te_activation_func
    wgrad_deferral_limit
    # validation
    eval_interval eval_iters full_validation multiple_validation_sets skip_train test_mode
    # vision
    classes_fraction data_per_class_fraction data_sharding dino_bottleneck_size dino_freeze_last_layer
    dino_head_hidden_size dino_local_crops_number dino_local_img_size dino_norm_last_layer
    dino_teacher_temp dino_warmup_teacher_temp dino_warmup_teacher_temp_epochs head_lr_mult img_h img_w
    iter_per_epoch mask_factor mask_type num_channels num_classes patch_dim swin_backbone_type
    vision_backbone_type vision_pretraining vision_pretraining_type
    # workload inspector
    run_workload_inspector_server
    # derived by parse_args / validate_args, or set when saving
    consumed_train_bins consumed_train_samples consumed_valid_samples cpu_offloading data_parallel_size
    grpo_samples_per_iteration iteration params_dtype rank skipped_train_samples
    transformer_pipeline_model_parallel_size use_custom_fsdp variable_seq_lengths world_size
    # added by Megatron-LM core_v0.19: checkpointing, data, distributed, fault injection, logits
    # distillation, inference, optimizer, profiling, rl, tokenizer, validation, performance knobs
    async_ckpt_cpu_priority async_ckpt_io_priority async_ckpt_use_cpu_shm async_strategy
    ckpt_fully_parallel_load_exchange_algo ckpt_fully_parallel_load_process_group
    ckpt_fully_parallel_save_process_group ckpt_load_validate_sharding_integrity dist_ckpt_workers
    override_ckpt_iteration save_activations_interval save_params_interval save_tokens_per_expert_interval
    stream_ckpt_dequant verify_integrity dataloader_inter_document_masking
    ddp_param_name_patterns_for_fp32_local_accumulation flight_recorder_dump_on_timeout
    flight_recorder_dump_path flight_recorder_extra_dump_on_exec flight_recorder_include_only_active
    flight_recorder_include_stack_trace flight_recorder_trace_buffer_size use_gloo_process_groups
    use_layer_wise_param_layout use_layer_wise_distributed_optimizer disable_msc_deprecated
    fault_injector_delay_start_iteration fault_injector_fault_delay fault_injector_fault_probabilities
    fault_injector_fault_types fault_injector_mtti_seconds fault_injector_num_ranks
    fault_injector_offset_seconds fault_injector_ranks fault_injector_seed logits_load_decode_threads
    logits_load_dir logits_load_ignore_errors logits_load_kd_loss_alpha logits_load_msc_prefetch_depth
    logits_load_prefetch_factor logits_save_dir logits_save_dtype logits_save_top_k logits_save_top_p
    logits_save_top_p_min_k cuda_graph_modules cuda_graph_scope_deprecated enable_chunked_prefill
    inference_cuda_graph_all_prefills inference_cuda_graph_max_tokens inference_cuda_graph_scope
    inference_disable_ep_consensus inference_disable_triton_nvls_kernels
    inference_dynamic_batching_async_sched_mode inference_dynamic_batching_cuda_graph_sizing_distribution
    inference_dynamic_batching_enable_prefix_caching inference_dynamic_batching_logprobs_mode
    inference_dynamic_batching_mamba_memory_ratio inference_dynamic_batching_prefix_caching_coordinator_policy
    inference_dynamic_batching_prefix_caching_eviction_policy
    inference_dynamic_batching_prefix_caching_mamba_gb inference_dynamic_batching_prefix_caching_routing_alpha
    inference_dynamic_batching_sampling_backend inference_dynamic_batching_track_generated_token_events
    inference_grouped_gemm_backend inference_max_requests inference_moe_disable_fused_quant_kernels
    inference_moe_token_dispatcher_type inference_shards inference_text_gen_server_logging
    inference_use_synchronous_zmq_collectives mamba_inference_conv_states_dtype
    mamba_inference_ssm_states_dtype mamba_training_ssm_states_dtype num_speculative_tokens
    offset_sampling_seed_by_dp_rank freeze_all_layers lion_beta1 lion_beta2 muon_coefficient_type
    muon_nesterov muon_scalar_optimizer fsdp_db_use_persist_buf_on_alloc_fail
    megatron_fsdp_enable_fine_grained_param_gather megatron_fsdp_grad_comm_dtype
    megatron_fsdp_main_grads_dtype megatron_fsdp_main_params_dtype megatron_fsdp_max_pool_double_buffer
    moe_routing_trace_capture_hidden_states moe_routing_trace_capture_logits moe_routing_trace_dump_weights
    moe_routing_trace_max_training_iters moe_routing_trace_path nvtx_ranges pytorch_profiler_collect_callstack
    pytorch_profiler_collect_chakra pytorch_profiler_collect_shapes record_shapes rl_consumption_granularity
    rl_generation_lag rl_inference_parsers rl_kv_cache_management_mode rl_persist_cuda_graphs rl_profile
    rl_profile_dir rl_submission_granularity chat_template metadata_path null_tokenizer_eod_id
    null_tokenizer_pad_id pad_vocab_size special_tokens tokenizer_hf_no_include_special_tokens
    tokenizer_hf_no_use_fast tokenizer_sentencepiece_ignore_extra_whitespaces eval_global_batch_size
    eval_micro_batch_size start_eval_at_iter validation_set_names _is_global_batch_size_explicitly_specified
    exit_signal_handler_for_training gpu_sniff_test_interval optimizer_cuda_graph step_batch_size_schedule
    activation_offload_fraction cpu_offloading_retain_pinned_cpu_buffers delay_offload_until_cuda_graph
    delta_offload_bytes_across_pp_ranks dsa_kernel_backend fine_grained_offloading_max_inflight_offloads
    flash_attention_version fp4_param_gather fp8_output_proj fused_residual_rmsnorm
    high_priority_a2a_comm_stream mlp_chunks_for_training moe_flex_dispatcher_num_sms
    moe_hybridep_num_blocks_permute moe_hybridep_num_blocks_unpermute moe_hybridep_num_sms_preprocessing
    moe_hybridep_pad_uneven_dispatch_inputs moe_ncclep_static_shape moe_ncclep_zero_copy moe_paged_stash
    moe_paged_stash_buffer_size_factor_cpu moe_paged_stash_buffer_size_factor_cuda moe_paged_stash_page_size
    moe_permute_fusion_into_hybridep moe_router_quantile_balancing_ema mtp_detach_heads
    overlap_dispatch_backward_with_experts_wgrad
    # the parser's shard counts; validate_args derives (expert_)gtp_weight_remat_size from them (refused)
    tensor_parallel_num_weight_shards expert_tensor_parallel_num_weight_shards
""")


def refused_fields(args: Any) -> list[tuple[str, Any, tuple]]:
    """(field, value, accepted values) for every field of ``args`` that changes the function and
    holds a value no reader maps."""
    out = []
    for name, accepted in REFUSED_UNLESS.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        norm = list(value) if isinstance(value, tuple) else value
        if not any(norm == a or (a is None and value is None) for a in accepted):
            out.append((name, value, accepted))
    return out


def check_args_fields(args: Any, path: object = None) -> None:
    """Refuse a checkpoint whose args change the model's function in a way no reader maps."""
    bad = refused_fields(args)
    if bad:
        name, value, accepted = bad[0]
        more = f" (and {', '.join(n for n, _, _ in bad[1:])})" if len(bad) > 1 else ""
        raise UnsupportedFamily(
            f"Megatron args {name}={value!r}{more} change the model's function, and ckptconv does not map "
            f"{name} (it supports {' or '.join(map(repr, accepted))})", path=path,
            fix="convert a model without it, or file an issue to have the field mapped")
